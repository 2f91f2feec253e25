"""Improved precision and recall (Kynkäänniemi et al. 2019) as an `evaluate` module, computed by diffusers-flat's
`precision_recall`.

    pr = evaluate.load("evaluate_modules/precision_recall")  # feature vectors, or "images" for InceptionV3's
    pr.compute(predictions=generated_features, references=real_features, k=3)
"""

import evaluate

from diffusers_flat.metrics.module_inputs import as_features, metric_info, module_features
from diffusers_flat.metrics.precision_recall import precision_recall

_CITATION = """\
@inproceedings{kynkaanniemi2019improved,
  title={Improved Precision and Recall Metric for Assessing Generative Models},
  author={Kynk{\\"a}{\\"a}nniemi, Tuomas and Karras, Tero and Laine, Samuli and Lehtinen, Jaakko and Aila, Timo},
  booktitle={Advances in Neural Information Processing Systems},
  year={2019}
}
"""

_DESCRIPTION = """\
Each set's manifold is the union of balls around its samples, each reaching the sample's k-th nearest neighbour in
its own set. Precision: the fraction of generated samples inside the real manifold (quality); recall: the fraction of
real samples inside the generated manifold (coverage). Higher is better.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: the generated images' feature vectors (config "features", the default) or the images themselves
        (config "images": uint8 HxW or HxWxC arrays or PIL images, passed through InceptionV3).
    references: the real images' features or images, as many as predictions (evaluate pairs them row by row).
    k: the neighbour that sets each ball's radius (default 3, the paper's).
Returns:
    precision, recall, k.
Examples:
    >>> pr = evaluate.load("evaluate_modules/precision_recall")
    >>> pr.compute(predictions=[[0.0], [1.0], [9.0]], references=[[0.0], [1.0], [2.0]], k=1)["precision"]
    0.6666666666666666
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PrecisionRecall(evaluate.Metric):
    def _info(self):
        return metric_info(
            _DESCRIPTION,
            _CITATION,
            _KWARGS_DESCRIPTION,
            "https://arxiv.org/abs/1904.06991",
            module_features(self.config_name),
        )

    def _compute(self, predictions, references, k: int = 3):
        generated, real = (as_features(rows, self.config_name) for rows in (predictions, references))
        return dict(precision_recall(real, generated, k))
