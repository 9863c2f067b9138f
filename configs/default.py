"""Base configuration: every field the code reads is defined here.

Experiment configs import this module, call `get_config()` and override a few fields.
Load any config with `--config=configs/NAME.py[:ARG]`; override single fields with
`--config.section.field=value`. The configs are locked, so a misspelt override fails.

The argument string may contain `runlocal`, which shrinks the run to a smoke test that
finishes in seconds on a laptop CPU. A config that serves a family takes the variant in the
same string (`configs/fcn_voc.py:8s,runlocal`; `parse_arg` splits it).

A config that replicates a paper fills `config.reported` (`set_reported`) with the number
its source reports: `experiments/replicate.py` reads it from each run's config.json, so the
number is written once, in the config.
"""

import functools
from collections.abc import Sequence

import ml_collections

# The fields a reported number applies to by default: a run that changes the model, the data
# or the split it is scored on measures something else than the paper did.
REPORTED_APPLIES_TO = ('model.name', 'dataset.name', 'dataset.eval_split')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the base configuration (a small U-Net on the synthetic `shapes` data)."""
    config = ml_collections.ConfigDict()
    config.seed = 0

    # --- Model (fcn_unet_jax.models.build_model reads this section only) ---
    config.model = ml_collections.ConfigDict()
    config.model.name = 'unet'  # A key of fcn_unet_jax.models.MODELS.
    config.model.num_classes = 4
    config.model.input_channels = 3
    config.model.dtype = 'float32'  # Compute dtype; parameters are always float32.
    config.model.width = 1.0  # Channel multiplier; 1.0 = the paper's widths.
    # Skip ablations. `skip_strides`: encoder output strides that feed the decoder; None =
    # the named model's paper default (e.g. (16, 8) for FCN-8s). `merge`: 'sum', 'concat'
    # or 'none' (no skips at all); None = the family's paper default (FCN: sum, U-Net: concat).
    config.model.skip_strides = ml_collections.config_dict.placeholder(tuple)
    config.model.merge = ml_collections.config_dict.placeholder(str)
    config.model.dropout_rate = ml_collections.config_dict.placeholder(float)  # None = paper.
    # FCN (VGG16): whether the intermediate (x2) upsamplers are learnable; the final one is
    # always frozen as in the reference implementation.
    config.model.learnable_upsampling = False
    # torchvision FCN-ResNet: auxiliary FCNHead on layer3.
    config.model.aux_head = False
    # ResNet encoder variant: 'torchvision' (stride in the 3x3 conv, bias-free convs) or
    # 'caffe' (stride in the first 1x1 conv, convs with bias; Keras Applications' ResNet50).
    config.model.resnet_variant = 'torchvision'
    # Classic U-Net: 'VALID' (the paper: 572 -> 388) or 'SAME' (output = input size).
    config.model.padding = 'SAME'
    config.model.batch_norm = False
    # U-Net decoders on ResNet/VGG encoders (segmentation_models_pytorch's layout).
    config.model.decoder_channels = (256, 128, 64, 32, 16)
    # Rematerialise encoder/decoder blocks in the backward pass (saves memory on big crops).
    config.model.remat = False
    # Run every op as plain Flax/XLA, without the measured CPU rewrites of fcn_unet_jax.ops
    # (same parameters and function): to check a result against the reference ops.
    config.model.plain_ops = False
    # BatchNorm statistics in training: 'global' (over the whole batch, synchronised across
    # devices, so results do not depend on the device count) or 'per_device' (over each
    # device's shard: fewer cross-device sums, results depend on the device count). See
    # docs/accelerators.md.
    config.model.batch_norm_stats = 'global'

    # --- Dataset (tfds builder and splits) ---
    config.dataset = ml_collections.ConfigDict()
    # tfds name, optionally with '/config' (e.g. voc_segmentation/sbd_fcn).
    config.dataset.name = 'shapes'
    config.dataset.data_dir = ml_collections.config_dict.placeholder(str)  # tfds data_dir.
    config.dataset.manual_dir = ml_collections.config_dict.placeholder(str)  # Archives.
    config.dataset.train_split = 'train'
    config.dataset.eval_split = 'validation'
    config.dataset.ignore_label = 255
    # `folder` dataset only: the user's root folder and the validation fraction used when no
    # split lists are given.
    config.dataset.folder_root = ml_collections.config_dict.placeholder(str)
    config.dataset.folder_val_fraction = 0.1
    # `volumes` dataset only: 2D slices of NIfTI / DICOM volumes with NIfTI label volumes.
    config.dataset.volume_root = ml_collections.config_dict.placeholder(str)  # images/, labels/.
    config.dataset.volume_val_fraction = 0.2  # Cases (never slices) to validation without splits/.
    config.dataset.slice_axis = 2  # Canonical RAS+ axis: 0 sagittal, 1 coronal, 2 axial.
    config.dataset.skip_empty_slices = False  # Leave out slices whose label has no foreground.
    config.dataset.intensity = 'percentile_zscore'  # 'ct_window', 'percentile_zscore' or 'none'.
    config.dataset.ct_window = (40.0, 400.0)  # (level, width) in HU, for 'ct_window'.
    config.dataset.percentiles = (0.5, 99.5)  # Per-volume clip percentiles, 'percentile_zscore'.

    # --- Input pipeline (tf.data) ---
    config.input = ml_collections.ConfigDict()
    config.input.crop_size = (128, 128)  # (height, width) of training crops.
    config.input.scale_range = (0.5, 2.0)  # Random rescale factors before cropping.
    config.input.hflip = True
    config.input.color_jitter = 0.0  # Strength of photometric jitter; 0 disables it.
    config.input.elastic = False  # U-Net elastic deformation (3x3 grid, 10 px std, cubic).
    config.input.elastic_grid = 3
    config.input.elastic_sigma = 10.0
    # 'imagenet' (mean/std), 'fcn_bgr' (Caffe BGR mean subtraction), 'unit' ([0, 1]) or
    # 'auto' (chosen from the model family).
    config.input.normalization = 'auto'
    # U-Net border weight map computed in the pipeline: w_c + w0 exp(-(d1+d2)^2 / 2 sigma^2).
    config.input.border_weights = False
    config.input.border_w0 = 10.0
    config.input.border_sigma = 5.0
    # Eval batches are padded (never resized) to this static (height, width); None = the
    # split's largest image size rounded up to a multiple of 32.
    config.input.eval_pad_size = ml_collections.config_dict.placeholder(tuple)
    config.input.prefetch = 2
    # Decode the train split once and keep it in memory (data/decoded_cache.py): for splits
    # far smaller than the machine's memory, whose images a run would decode every epoch.
    config.input.cache_decoded = False

    config.batch_size = 8  # Global batch size, independent of the number of devices.
    config.eval_batch_size = 8  # Global eval batch size.

    # --- Loss ---
    config.loss = ml_collections.ConfigDict()
    config.loss.name = 'cross_entropy'  # 'cross_entropy', 'dice' or 'cross_entropy+dice'.
    config.loss.normalization = 'mean'  # 'mean' over valid pixels, or the FCN's 'sum'.
    config.loss.class_weights = ml_collections.config_dict.placeholder(tuple)
    config.loss.dice_weight = 1.0  # Weight of the Dice term in 'cross_entropy+dice'.
    config.loss.aux_weight = 0.5  # torchvision's auxiliary loss weight.

    # --- Optimiser ---
    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.name = 'adamw'  # 'sgd', 'adam' or 'adamw'.
    config.optimizer.learning_rate = 1e-3
    config.optimizer.schedule = 'cosine'  # 'constant', 'poly' or 'cosine'.
    config.optimizer.poly_power = 0.9
    config.optimizer.warmup_steps = 0
    config.optimizer.momentum = 0.9
    config.optimizer.nesterov = False
    config.optimizer.weight_decay = 1e-4
    config.optimizer.bias_lr_multiplier = 1.0  # FCN: 2.0.
    config.optimizer.bias_weight_decay = False  # FCN: no weight decay on biases.
    config.optimizer.grad_clip_norm = ml_collections.config_dict.placeholder(float)
    # Regexes on '/'-joined parameter paths (e.g. 'encoder/'); matching params never change.
    config.optimizer.frozen_params = ()

    # --- Training schedule ---
    config.num_train_steps = 1000
    config.log_every_steps = 50
    config.eval_every_steps = 500
    config.checkpoint_every_steps = 500
    config.keep_checkpoints = 3
    # Initialisation: a converted pretrained checkpoint (fcn_unet_jax.weights), or the
    # workdir of a previous run (FCN staging 32s -> 16s -> 8s). None, '' or 'None' (as the
    # command line gives it: --config.init_from=None): from scratch.
    config.init_from = ml_collections.config_dict.placeholder(str)

    # --- Evaluation / inference ---
    config.eval = ml_collections.ConfigDict()
    config.eval.mode = 'whole'  # 'whole' or 'sliding'.
    config.eval.window_size = ml_collections.config_dict.placeholder(tuple)
    config.eval.window_overlap = 0.25
    config.eval.flip = False
    config.eval.scales = (1.0,)
    # Examples of the eval split (its first ones) whose image | ground truth | prediction
    # panels each evaluation writes to TensorBoard, with the confusion matrix; 0: none.
    config.eval.tensorboard_images = 4

    # --- The number the replicated paper reports (read by experiments/replicate.py) ---
    # Filled by `set_reported` in the configs that replicate a paper; these defaults mean
    # "no reported number" (`recipe` empty: no other field of the section is read).
    config.reported = ml_collections.ConfigDict()
    config.reported.recipe = ''  # The --config value that sets it: 'configs/fcn_voc.py:32s'.
    config.reported.title = ''  # The recipe's name in the table, e.g. 'FCN-32s'.
    config.reported.split_label = ''  # The source's name of the eval split: 'seg11valid'.
    config.reported.metric = ''  # The source's name of its number, e.g. 'mean IU'.
    config.reported.mean_iou = ml_collections.config_dict.placeholder(float)  # %; None: none.
    config.reported.pixel_accuracy = ml_collections.config_dict.placeholder(float)  # %.
    config.reported.source = ''  # Where the number comes from.
    config.reported.flag = ''  # Short warning in the table's notes; '' = the numbers compare.
    config.reported.caveat = ''  # The full explanation of `flag`, printed under the table.
    # (field, value) pairs: the recipe's values of the fields the number applies to. Copies,
    # not `get_ref`s, on purpose: a run that overrides one of them keeps the recipe's value
    # here, and the table does not compare that run with the paper.
    config.reported.applies_to = ()

    if arg and 'runlocal' in arg.split(','):
        apply_runlocal(config)
    return config


def apply_runlocal(config: ml_collections.ConfigDict) -> None:
    """Shrinks `config` in place to a smoke run (tiny widths, a few steps, small crops)."""
    config.model.width = 0.125
    config.input.crop_size = (64, 64)
    config.batch_size = 2
    config.eval_batch_size = 2
    config.num_train_steps = 4
    config.log_every_steps = 2
    config.eval_every_steps = 4
    config.checkpoint_every_steps = 4


def parse_arg(arg: str | None, config_path: str, choices: Sequence[str]) -> tuple[str, bool]:
    """Splits a family config's argument `CHOICE[,runlocal]` into (choice, runlocal).

    Args:
      arg: the string after the config path's colon; options comma-separated, any order.
      config_path: the config's path (e.g. 'configs/fcn_voc.py'), for the error message.
      choices: the valid values of the one required option.

    Returns:
      The chosen value and whether `runlocal` was given.

    Raises:
      ValueError: one line naming the valid values, for a missing, unknown or repeated
        choice.
    """
    parts = arg.split(',') if arg else []
    rest = [part for part in parts if part != 'runlocal']
    if len(rest) != 1 or rest[0] not in choices:
        raise ValueError(
            f'{config_path} takes one of {", ".join(choices)} as its argument (plus an '
            f'optional ",runlocal"), got {arg!r}; e.g. --config={config_path}:{choices[0]}'
        )
    return rest[0], 'runlocal' in parts


def set_reported(
    config: ml_collections.ConfigDict,
    *,
    recipe: str,
    title: str,
    split_label: str,
    metric: str,
    source: str,
    mean_iou: float | None = None,
    pixel_accuracy: float | None = None,
    flag: str = '',
    caveat: str = '',
    applies_to: Sequence[str] = REPORTED_APPLIES_TO,
) -> None:
    """Fills every field of `config.reported` (see `get_config`) for a paper replication.

    Call it once the recipe's model and dataset are set: it records the config's current
    values of the `applies_to` fields, which a run must keep to be compared with the number.

    Args:
      config: the experiment's config, changed in place.
      recipe: the `--config` value that builds this recipe, e.g. 'configs/fcn_voc.py:32s'.
      title: the recipe's name in the replication table.
      split_label: the source's name of the eval split.
      metric: the source's name of its number.
      source: where the number comes from.
      mean_iou: the reported mean IoU in percent; None when no number can be compared.
      pixel_accuracy: the reported pixel accuracy in percent, when the source gives one.
      flag: a short warning for the table's notes ('' when the numbers compare).
      caveat: the full explanation of `flag`, printed under the table.
      applies_to: dotted names of the fields the number applies to.
    """
    config.reported.recipe = recipe
    config.reported.title = title
    config.reported.split_label = split_label
    config.reported.metric = metric
    config.reported.source = source
    config.reported.mean_iou = mean_iou
    config.reported.pixel_accuracy = pixel_accuracy
    config.reported.flag = flag
    config.reported.caveat = caveat
    config.reported.applies_to = tuple(
        (field, functools.reduce(getattr, field.split('.'), config)) for field in applies_to
    )
