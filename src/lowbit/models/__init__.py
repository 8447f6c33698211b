"""Models: loading from every source, the offline zoo, layer matching, lowbit folders."""

from lowbit.models.checkpoint import load_folder, read_manifest, save_folder
from lowbit.models.kernels import use_kernels
from lowbit.models.load import LoadedModel, load_model
from lowbit.models.modules import get_module, quantizable_layers, set_module, untie_if_needed
from lowbit.models.zoo import random_models, zoo

__all__ = [
    "LoadedModel",
    "get_module",
    "load_folder",
    "load_model",
    "quantizable_layers",
    "random_models",
    "read_manifest",
    "save_folder",
    "set_module",
    "untie_if_needed",
    "use_kernels",
    "zoo",
]
