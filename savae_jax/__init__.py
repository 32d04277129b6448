"""savae_jax: variational autoencoders trained by simulated annealing, measured against Optax.

Everything is a pure function of ``(key, params, batch)``; one loss function,
``make_loss(model)``, is shared by every optimizer.
"""

from savae_jax import annealing, beta, checkpoint, data, driver, evaluation, models, objectives, optimizer, training
from savae_jax.data import Dataset, load
from savae_jax.objectives import ELBOParts, elbo, gaussian_kl, iwae_bound, make_loss
from savae_jax.evaluation import diagnostics, evaluate, evaluate_iwae
from savae_jax.models import ConvVAE, MLPVAE
from savae_jax.driver import Phase
from savae_jax.optimizer import Optimizer, from_optax
from savae_jax.training import fit

__version__ = "0.1.0"

__all__ = [
    "ConvVAE",
    "Dataset",
    "ELBOParts",
    "MLPVAE",
    "annealing",
    "beta",
    "checkpoint",
    "data",
    "diagnostics",
    "driver",
    "elbo",
    "evaluate",
    "evaluate_iwae",
    "evaluation",
    "fit",
    "from_optax",
    "gaussian_kl",
    "iwae_bound",
    "load",
    "make_loss",
    "models",
    "objectives",
    "optimizer",
    "Optimizer",
    "Phase",
    "training",
]
