"""Data: tfds builders (`builders`), the tf.data input pipeline and joint image/mask ops."""
