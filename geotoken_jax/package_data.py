"""Data files that ship inside installed PyPI packages (found without importing the package)."""

from __future__ import annotations

import importlib.metadata
import os


def package_file(distribution: str, relative_path: str, *, install: str, needed_for: str) -> str:
  """Path of `relative_path` inside the installed `distribution`; a clear error if it is missing."""
  try:
    path = str(importlib.metadata.distribution(distribution).locate_file(relative_path))
  except importlib.metadata.PackageNotFoundError:
    raise FileNotFoundError(f"{needed_for} needs the '{distribution}' package for {relative_path}; "
                            f"install it with: {install}") from None
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} is missing from the installed '{distribution}' package; "
                            f"reinstall it with: {install}")
  return path
