"""savae_jax: variational autoencoders trained by simulated annealing, measured against Optax.

Everything is a pure function of ``(key, params, batch)``; one loss function,
``make_loss(model)``, is shared by every optimizer.
"""

from savae_jax import annealing, data, elbo, evaluation, models, training
from savae_jax.data import Dataset, load
from savae_jax.elbo import ELBOParts, gaussian_kl, make_loss
from savae_jax.evaluation import evaluate
from savae_jax.models import MLPVAE
from savae_jax.training import Algorithm, fit

__version__ = "0.1.0"

__all__ = [
    "Algorithm",
    "Dataset",
    "ELBOParts",
    "MLPVAE",
    "annealing",
    "data",
    "elbo",
    "evaluate",
    "evaluation",
    "fit",
    "gaussian_kl",
    "load",
    "make_loss",
    "models",
    "training",
]
