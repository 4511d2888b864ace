"""robustprune: compress neural networks while keeping benign, adversarial and verified robustness.

Pre-train, prune, fine-tune — with the same robust objective in both training stages (Sehwag et al. 2019).
"""
from robustprune.infra.version import __version__

from robustprune.data import load_dataset  # noqa: E402
from robustprune.models import create_model  # noqa: E402
from robustprune.train import fit  # noqa: E402
from robustprune.pruning import prune  # noqa: E402
from robustprune.evaluate import evaluate  # noqa: E402
from robustprune import export  # noqa: E402
from robustprune.pipeline import compress, run  # noqa: E402

__all__ = ["__version__", "compress", "create_model", "evaluate", "export", "fit", "load_dataset", "prune", "run"]
