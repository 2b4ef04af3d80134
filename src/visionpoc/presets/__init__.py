"""Model presets: the original PoC's models and today's candidates, with their facts.

- `table`: reads the packaged `configs/presets.yaml` as plain data and resolves `{preset: NAME}` config
  entries (a foundation: `config` uses it, so it imports neither torch nor timm);
- `facts`: validates the table and adds what timm knows (params, GFLOPs, pretraining data, licences).

This file imports neither, so that loading a config stays light.
"""
