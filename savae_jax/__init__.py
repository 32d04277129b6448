"""savae_jax: variational autoencoders trained by simulated annealing, measured against Optax.

Everything is a pure function of ``(key, params, batch)``; one loss function,
``make_loss(model)``, is shared by every optimizer.
"""

from savae_jax import annealing, beta, checkpoint, data, evaluation, models, objectives, runner, training
from savae_jax.data import Dataset, load
from savae_jax.objectives import ELBOParts, elbo, gaussian_kl, iwae_bound, make_loss
from savae_jax.evaluation import diagnostics, evaluate, evaluate_iwae
from savae_jax.models import ConvVAE, MLPVAE
from savae_jax.training import Algorithm, fit

__version__ = "0.1.0"

__all__ = [
    "Algorithm",
    "ConvVAE",
    "Dataset",
    "ELBOParts",
    "MLPVAE",
    "annealing",
    "beta",
    "checkpoint",
    "data",
    "diagnostics",
    "elbo",
    "evaluate",
    "evaluate_iwae",
    "evaluation",
    "fit",
    "gaussian_kl",
    "iwae_bound",
    "load",
    "make_loss",
    "models",
    "objectives",
    "runner",
    "training",
]
