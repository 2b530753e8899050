"""``gq prior``: an autoregressive transformer prior over the token files of ``gq tokenize``.

* :mod:`.layout` -- index maps ``(B, G, h, w)`` <-> token sequences for x-transformers'
  ``AutoregressiveWrapper`` (one token per sequence position);
* :mod:`.model` -- the network (x-transformers ``TransformerWrapper`` + ``Decoder``), built from a
  config's ``model`` section;
* :mod:`.config` -- defaults + a YAML file + ``key=value`` overrides;
* :mod:`.train` -- ``gq prior train TOKENS --out RUN``: resumable, accelerate, held-out bits;
* :mod:`.sample` -- ``gq prior sample RUN --n N --out DIR``: samples decoded by the tokenizer.

The prior reads tokens only through :class:`~gq_plugin.lab.tokenize_dataset.TokenDataset` and
decodes only through :mod:`gq_plugin.lab.tokenizer` ("indices in, images out"), so GQ and the
VQ / FSQ / LFQ / BSQ / TokenBridge baselines are compared through one code path.
"""

from .config import PRIOR_DEFAULTS, load_prior_config
from .layout import TokenLayout
from .model import build_prior, sequence_nll
from .sample import sample
from .train import evaluate_nll, load_prior, train_prior

__all__ = ["PRIOR_DEFAULTS", "load_prior_config", "TokenLayout", "build_prior", "sequence_nll", "train_prior", "evaluate_nll",
           "load_prior", "sample"]
