"""Networks: a factory over MONAI's networks, the slice-sequence classifier, local weights."""
from slab.networks.factory import (NETWORK_NAMES, build_network, network_divisor, network_min_size, padded_size,
                                   parameter_count)
from slab.networks.sequence import BACKBONES, SliceSequenceClassifier
from slab.networks.weights import load_weights, read_state_dict, save_weights

__all__ = [
    "BACKBONES",
    "NETWORK_NAMES",
    "SliceSequenceClassifier",
    "build_network",
    "load_weights",
    "network_divisor",
    "network_min_size",
    "padded_size",
    "parameter_count",
    "read_state_dict",
    "save_weights",
]
