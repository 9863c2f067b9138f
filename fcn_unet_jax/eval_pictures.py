"""The pictures each evaluation writes to TensorBoard (the IMAGES tab of the workdir).

* `eval/predictions`: image | ground truth | prediction for the first
  `config.eval.tensorboard_images` examples of the eval split (the same examples at every
  evaluation, so the panels show training progress), titled, with the class legend
  (`visualize.evaluation_panels`);
* `eval/confusion_matrix`: the pass's confusion matrix, each ground-truth row divided by
  its sum (`visualize.confusion_matrix_image`).

The predictions come from the run's own inference (`inference.make_predict_fn`, the
config's eval mode and test-time views), on the mesh like the eval step; only process 0
renders and writes.
"""

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from clu import metric_writers

from fcn_unet_jax import console, inference, sharding, visualize
from fcn_unet_jax.data import augment, input_pipeline

PREDICTIONS_TAG = 'eval/predictions'
CONFUSION_TAG = 'eval/confusion_matrix'


def jit_predict(
    model: Any, config: Any, mesh: jax.sharding.Mesh
) -> Callable[[Any, jax.Array], jax.Array]:
    """`(state, images) -> class indices` with the run's inference, jitted over `mesh`."""
    predict_fn = inference.make_predict_fn(model, config, mesh)
    return jax.jit(
        lambda state, images: jnp.argmax(predict_fn(state.variables(), images), axis=-1),
        in_shardings=(sharding.replicated_sharding(mesh), sharding.batch_sharding(mesh)),
        out_shardings=sharding.replicated_sharding(mesh),
    )


class EvalPictures:
    """Renders and writes the pictures of an evaluation of a `train.Trainer`'s state.

    The examples are read once, at the first `write`. `predict` is the trainer's
    `jit_predict` program (built here when None; a sweep's runs share theirs, see
    `run_programs.py`).
    """

    def __init__(self, trainer: Any, predict: Callable[[Any, jax.Array], jax.Array] | None = None):
        self._trainer = trainer
        self._count = trainer.config.eval.tensorboard_images
        self._examples: dict[str, np.ndarray] | None = None
        self._kept: list[int] = []
        self._images: jax.Array | None = None
        self._predict = console.FirstCallLogger(
            predict or jit_predict(trainer.model, trainer.config, trainer.mesh),
            'the predictions for TensorBoard',
        )

    def _first_batch(self) -> None:
        """Keeps the first eval batch: on the mesh for prediction, and the host copy."""
        iterable = input_pipeline.create_eval_iterable(
            self._trainer.config,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        local = next(iter(iterable))
        self._images = sharding.global_batch(local, self._trainer.batch_sharding)['image']
        # Process 0 reads the split's first examples: its local batch leads the global one.
        keep = [i for i in range(min(self._count, len(local['mask']))) if local['mask'][i].any()]
        self._examples = {key: local[key][keep] for key in ('image', 'label', 'mask')}
        self._kept = keep  # Their rows in the global batch, whose predictions they show.

    def write(
        self, writer: metric_writers.MetricWriter, step: int, result: Mapping[str, Any]
    ) -> None:
        """Writes the panels of the current state and the confusion image of `result`.

        Every process must call it (the prediction runs on the whole mesh).

        Args:
          writer: the run's CLU writer.
          step: the training step of the evaluation.
          result: `Trainer.evaluate`'s result (reads `confusion_matrix`).
        """
        if self._count <= 0:
            return
        if self._images is None:
            self._first_batch()
        predictions = sharding.to_host(self._predict(self._trainer.state, self._images))
        if jax.process_index() != 0:
            return
        info, config = self._trainer.info, self._trainer.config
        pictures = {}
        examples = self._examples
        if len(examples['mask']):
            # Cropped to the largest example: the panels of a batch share one size.
            rows, cols = np.nonzero(examples['mask'].any(axis=0))
            height, width = rows.max() + 1, cols.max() + 1
            mean, scale, bgr = augment.statistics(
                input_pipeline.normalization_for(config), config.model.input_channels
            )
            pictures[PREDICTIONS_TAG] = visualize.evaluation_panels(
                examples['image'][:, :height, :width],
                examples['label'][:, :height, :width],
                np.where(examples['mask'], predictions[self._kept], info.ignore_label)[
                    :, :height, :width
                ],
                info.class_names,
                mean,
                scale,
                palette=info.palette,
                ignore_label=info.ignore_label,
                bgr=bgr,
            )
        pictures[CONFUSION_TAG] = visualize.confusion_matrix_image(
            np.asarray(result['confusion_matrix']), info.class_names
        )[None]
        writer.write_images(step, pictures)
