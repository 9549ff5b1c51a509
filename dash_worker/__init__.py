"""DASH worker side (installed as ``dash_worker``): the agent that runs Dask workers on a machine."""
