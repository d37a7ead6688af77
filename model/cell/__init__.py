"""One grid cell end to end (``pipeline.run_cell``: train, evaluate, the downstream stages of
``stages.run_downstream``): the top of the library, above the engine and the task heads."""
