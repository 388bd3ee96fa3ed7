"""`dsexport doctor`: an environment report and a tiny end-to-end self-test, printed
as one block to paste into a bug report.

It sits above both export and runtime (it builds artifacts and runs them), so neither
of those imports it; the `dsexport` entry point is composed here (doctor/cli.py).
"""
