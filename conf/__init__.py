"""The packaged recipes: installed as ``mezo_core.recipes`` (see pyproject.toml), so
``mezo-run train`` finds ``sst2.yaml`` from any folder and ``mezo-run init`` copies them."""
