"""TensorBoard summaries written with core TensorFlow only (the tensorboard package is
optional): scalars, PNG images, and the view pairs of a run's first batch."""
from __future__ import annotations


def _summary_metadata(plugin: str, display_name: str = ""):
    from tensorflow.core.framework import summary_pb2  # core TF, no tensorboard package
    return summary_pb2.SummaryMetadata(
        display_name=display_name,
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin)).SerializeToString()


def scalar_summary(name: str, value: float, step: int) -> None:
    """A TensorBoard scalar (the "scalars" plugin format)."""
    import tensorflow as tf
    tf.summary.write(name, tf.constant(float(value), tf.float32), step=step,
                     metadata=_summary_metadata("scalars"))


def image_summary(name: str, images, step: int) -> None:
    """TensorBoard images (float [N,H,W,3] in [0,1]) in the "images" plugin format."""
    import tensorflow as tf
    images = tf.convert_to_tensor(images)
    height, width = int(images.shape[1]), int(images.shape[2])
    pngs = [tf.io.encode_png(tf.image.convert_image_dtype(im, tf.uint8, saturate=True))
            for im in tf.unstack(images)]
    tensor = tf.stack([tf.as_string(width), tf.as_string(height)] + pngs)
    tf.summary.write(name, tensor, step=step, metadata=_summary_metadata("images"))


def _overlay(views, masks):
    """Views with the foreground kept and the background darkened and tinted red."""
    import tensorflow as tf
    tint = tf.constant([0.6, 0.0, 0.0], tf.float32)
    return views * masks + (0.35 * views + tint * 0.4) * (1.0 - masks)


def write_image_summary(c, writer, step: int) -> None:
    """A few view pairs (view 1 | view 2) with masks overlaid, to check the inputs by eye.
    ``c``: the PretrainConfig (its files, view configs and ``image_summaries``)."""
    import tensorflow as tf
    from harl_tf.data import augment
    from harl_tf.data.pipeline import pretrain_dataset
    if c.image_summaries <= 0:
        return
    batch = next(iter(pretrain_dataset(c.train_files, c.image_summaries, c.image_size,
                                       seed=c.seed, shuffle_buffer=16,
                                       view_configs=augment.view_configs_from(c))))
    pairs = tf.concat([_overlay(batch["view1"], batch["mask1"]),
                       _overlay(batch["view2"], batch["mask2"])], axis=2)
    with writer.as_default():
        image_summary("views_with_masks", pairs, step)
    writer.flush()
