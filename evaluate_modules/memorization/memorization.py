"""The memorization ratio (Yoon et al. 2023; Gu et al. 2023) as an `evaluate` module, computed by diffusers-flat's
`memorization_ratio`.

    memorization = evaluate.load("evaluate_modules/memorization")
    memorization.compute(predictions=generated_images, training=training_images)["memorization_ratio"]
"""

import datasets
import evaluate

from diffusers_flat.metrics.memorization import memorization_ratio
from diffusers_flat.metrics.module_inputs import as_uint8_images, metric_info

_CITATION = """\
@inproceedings{yoon2023diffusion,
  title={Diffusion Probabilistic Models Generalize when They Fail to Memorize},
  author={Yoon, TaeHo and Choi, Joo Young and Kwon, Sehyun and Ryu, Ernest K.},
  booktitle={ICML Workshop on Structured Probabilistic Inference and Generative Modeling},
  year={2023}
}
"""

_DESCRIPTION = """\
The fraction of generated images whose nearest training image (L2 in pixel space) is closer than `threshold` (1/3)
times the second nearest. Lower means less memorization.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: the generated images (uint8 HxW or HxWxC arrays or PIL images).
    training: the training images, any number of them (a set searched for each prediction's nearest neighbours,
        not references paired with the predictions, which evaluate would require to be as many).
    threshold: the ratio of the nearest to the second-nearest distance under which an image counts as memorized.
Returns:
    memorization_ratio, num_generated, num_training, threshold.
Examples:
    >>> import numpy as np
    >>> memorization = evaluate.load("evaluate_modules/memorization")
    >>> training = np.stack([np.full((2, 2), v, dtype=np.uint8) for v in (0, 100, 200)])
    >>> memorization.compute(predictions=[training[1]], training=training)["memorization_ratio"]
    1.0
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Memorization(evaluate.Metric):
    def _info(self):
        return metric_info(
            _DESCRIPTION,
            _CITATION,
            _KWARGS_DESCRIPTION,
            "https://arxiv.org/abs/2306.03436",
            datasets.Features({"predictions": datasets.Image()}),
        )

    def _compute(self, predictions, training, threshold: float = 1 / 3):
        result = memorization_ratio(as_uint8_images(predictions), as_uint8_images(training), threshold)
        return {key: result[key] for key in ("memorization_ratio", "num_generated", "num_training", "threshold")}
