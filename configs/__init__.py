"""The configs that ship with xlstm-pipeline: run configs (demo, tiny), model sizes (model/), recipes,
studies and lm-eval task files (eval/). `xlp configs` lists them; `xlp run tiny` runs one by name."""
