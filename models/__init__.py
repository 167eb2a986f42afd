"""The networks: V (vae), M (mdnrnn), C (controller)."""

from models.vae import ConvVAE, VAEConfig  # noqa: F401
from models.mdnrnn import MIXTURES, MDNOutput, MDNRNN, MDNRNNConfig, mdn_loss, sample_next_z  # noqa: F401
from models.controller import Controller, ControllerConfig  # noqa: F401
