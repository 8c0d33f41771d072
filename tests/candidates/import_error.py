"""Imports a module that does not exist."""
import torch_that_does_not_exist  # noqa: F401

from frozen_env.harness import Harness

Harness.from_env()
