"""Learned output-length predictor (torch + numpy; kept out of the pure `tetri.sched`).

  features.py  hashed n-gram + prompt-length features of prompt text
  model.py     the classifiers, save/load (meta.json + weights.safetensors), LearnedPredictor
  train.py     seeded CPU training for the text model and the hidden-state probe
  data.py      JSONL examples, length counting, AlpacaEval conversion
  generate.py  the served model's own greedy lengths + hidden states (`--log-lengths` format)
  crossval.py  K-fold-by-prompt held-back scoring, confusion matrices
  cli.py       `tetri-predictor train | eval | prepare-alpaca | generate | cv`
  registry.py  `make_predictor(spec)`: none | oracle | model:DIR

`tetri.predictor.registry.make_predictor("model:DIR")` loads a saved model through
`tetri.predictor.model.load_predictor`.
"""
