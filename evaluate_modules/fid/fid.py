"""Fréchet Inception Distance as an `evaluate` module, computed by diffusers-flat's `FID` (torchmetrics underneath).

fid = evaluate.load("evaluate_modules/fid")              # feature vectors, any feature space
fid.compute(predictions=generated_features, references=real_features)["fid"]
fid = evaluate.load("evaluate_modules/fid", "images")    # images: the TF-ported InceptionV3's features
fid.compute(predictions=generated_images, references=real_images)
"""

import evaluate

from diffusers_flat.metrics.fid import FID, PrecomputedFeatures
from diffusers_flat.metrics.module_inputs import as_features, metric_info, module_features

_CITATION = """\
@inproceedings{heusel2017gans,
  title={GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium},
  author={Heusel, Martin and Ramsauer, Hubert and Unterthiner, Thomas and Nessler, Bernhard and Hochreiter, Sepp},
  booktitle={Advances in Neural Information Processing Systems},
  year={2017}
}
"""

_DESCRIPTION = """\
The Fréchet distance between Gaussians fitted to the features of generated and real images:
||mu_g - mu_r||^2 + Tr(S_g + S_r - 2 (S_g S_r)^(1/2)). Lower is better. Biased upward at small sample counts:
compare models at equal counts, or use KID.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: the generated images' feature vectors (config "features", the default) or the images themselves
        (config "images": uint8 HxW or HxWxC arrays or PIL images, passed through InceptionV3).
    references: the real images' features or images, as many as predictions (evaluate pairs them row by row).
Returns:
    fid: the Fréchet distance.
    (At least 100 of each: fewer give no meaningful FID.)
Examples:
    >>> import numpy as np
    >>> fid = evaluate.load("evaluate_modules/fid")
    >>> real = np.random.default_rng(0).normal(size=(200, 8))
    >>> round(fid.compute(predictions=real + 1.0, references=real)["fid"], 6)  # a shift of 1 in 8 dimensions: 8
    8.0
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Fid(evaluate.Metric):
    def _info(self):
        return metric_info(
            _DESCRIPTION,
            _CITATION,
            _KWARGS_DESCRIPTION,
            "https://arxiv.org/abs/1706.08500",
            module_features(self.config_name),
        )

    def _compute(self, predictions, references):
        generated, real = (as_features(rows, self.config_name) for rows in (predictions, references))
        fid = FID(PrecomputedFeatures(real.shape[1]), show_progress=False)
        fid.set_real_features(real)
        return {"fid": fid.scores_of_features(generated)["fid"]}
