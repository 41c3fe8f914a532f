"""The Keras recipe of the reference tutorials, timed from folder to saved model.

image_dataset_from_directory (20% validation, 224 px, batch 32), MobileNetV2
include_top=False frozen + GlobalAveragePooling + Dense softmax, Adam,
fit for 6 epochs with validation each epoch, then save. No ImageNet weights
for it exist offline, so the base is randomly initialised: the timing is the
same, the accuracy is not meaningful.

Run with a Python that has tensorflow-cpu: python bench/keras_recipe.py DATA OUT.keras
Prints one JSON line: {"seconds": ..., "val_accuracy": ...}.
"""

import json
import sys
import time

start = time.perf_counter()
import tensorflow as tf  # noqa: E402

data, out = sys.argv[1], sys.argv[2]
size, batch = (224, 224), 32
train = tf.keras.utils.image_dataset_from_directory(
    data, validation_split=0.2, subset="training", seed=0, image_size=size, batch_size=batch
)
val = tf.keras.utils.image_dataset_from_directory(
    data, validation_split=0.2, subset="validation", seed=0, image_size=size, batch_size=batch
)
n_classes = len(train.class_names)
train, val = train.prefetch(tf.data.AUTOTUNE), val.prefetch(tf.data.AUTOTUNE)

base = tf.keras.applications.MobileNetV2(input_shape=size + (3,), include_top=False, weights=None)
base.trainable = False
inputs = tf.keras.Input(shape=size + (3,))
x = tf.keras.applications.mobilenet_v2.preprocess_input(inputs)
x = base(x, training=False)
x = tf.keras.layers.GlobalAveragePooling2D()(x)
outputs = tf.keras.layers.Dense(n_classes, activation="softmax")(x)
model = tf.keras.Model(inputs, outputs)
model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
history = model.fit(train, epochs=6, validation_data=val, verbose=2)
model.save(out)
print(json.dumps({"seconds": time.perf_counter() - start, "val_accuracy": history.history["val_accuracy"][-1]}))
