"""Kernel Inception Distance as an `evaluate` module, computed by diffusers-flat's `FID` (torchmetrics underneath).

kid = evaluate.load("evaluate_modules/kid")              # feature vectors, or "images" for InceptionV3's
kid.compute(predictions=generated_features, references=real_features)["kid"]
"""

import evaluate

from diffusers_flat.metrics.fid import FID, PrecomputedFeatures
from diffusers_flat.metrics.module_inputs import as_features, metric_info, module_features

_CITATION = """\
@inproceedings{binkowski2018demystifying,
  title={Demystifying {MMD} {GAN}s},
  author={Bi{\\'n}kowski, Miko{\\l}aj and Sutherland, Danica J. and Arbel, Michael and Gretton, Arthur},
  booktitle={International Conference on Learning Representations},
  year={2018}
}
"""

_DESCRIPTION = """\
The unbiased squared maximum mean discrepancy between generated and real features with the cubic polynomial kernel
k(a, b) = (a.b / d + 1)^3, averaged over random subsets. Unbiased at small sample counts, unlike FID. Lower is better.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: the generated images' feature vectors (config "features", the default) or the images themselves
        (config "images": uint8 HxW or HxWxC arrays or PIL images, passed through InceptionV3).
    references: the real images' features or images, as many as predictions (evaluate pairs them row by row).
    subsets: the number of random subsets (default 100).
    subset_size: the largest subset (default 1000; at most the number of images).
    seed: the subsets' random draw.
Returns:
    kid: the mean over the subsets; kid_std: its standard deviation over them.
    (At least 100 of each.)
Examples:
    >>> import numpy as np
    >>> kid = evaluate.load("evaluate_modules/kid")
    >>> real = np.random.default_rng(0).normal(size=(200, 8))
    >>> shifted, same = (kid.compute(predictions=x, references=real)["kid"] for x in (real + 1.0, real))
    >>> shifted > 1.0 > abs(same)
    True
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Kid(evaluate.Metric):
    def _info(self):
        return metric_info(
            _DESCRIPTION,
            _CITATION,
            _KWARGS_DESCRIPTION,
            "https://arxiv.org/abs/1801.01401",
            module_features(self.config_name),
        )

    def _compute(self, predictions, references, subsets: int = 100, subset_size: int = 1000, seed: int = 0):
        generated, real = (as_features(rows, self.config_name) for rows in (predictions, references))
        kid = FID(
            PrecomputedFeatures(real.shape[1]), show_progress=False, kid_subsets=subsets, kid_subset_size=subset_size
        )
        kid.set_real_features(real)
        result = kid.scores_of_features(generated, seed)["kid"]
        return {"kid": result["mean"], "kid_std": result["std"]}
