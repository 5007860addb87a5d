"""A config frozen as JSON (a sweep variant's frozen_config.json), for --config:

  python -m geotoken_jax.train --config geotoken_jax/frozen_config.py:DIR/VARIANT/frozen_config.json ...

The file is read as it is: the config file the sweep was expanded from is not read again.
"""

from __future__ import annotations

import json

import ml_collections
from etils import epath


def get_config(path: str | None = None) -> ml_collections.ConfigDict:
  if not path:
    raise ValueError("frozen_config.py needs the JSON file: --config .../frozen_config.py:PATH")
  return ml_collections.ConfigDict(json.loads(epath.Path(path).read_text()))
