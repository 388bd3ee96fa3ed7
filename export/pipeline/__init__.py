"""The build pipeline: MindIR export per rank, the Lite stage, the embedded default model,
and the MindIR inspector."""
