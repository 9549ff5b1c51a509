"""``python -m dash_worker``: same as the ``dash-worker`` command."""

from dash_worker.cli import main

# The guard matters: Dask's nannies start workers with multiprocessing "spawn", which
# re-imports this module in every worker process.
if __name__ == "__main__":
    main()
