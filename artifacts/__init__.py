"""The artifact contract between building and running: the manifest (reading, writing,
verification), artifact file names, and the Lite model entries.

Both dsflow.export (which writes artifacts) and dsflow.runtime (which loads them) build on it;
it builds only on dsflow.graphs and dsflow.common."""
