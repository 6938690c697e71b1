"""1MD120 report, exercises 1.1-1.4: an FNN and a small CNN on MNIST, and the CNN's first ablations."""
from experiments.common import base_config, variant


def mnist_fnn():
    """Exercise 1.1: 784-800-10, ReLU, SGD lr 1, batch 1024, 30 epochs; the report reached 98%."""
    return base_config(
        "mnist_fnn", mnist_fnn.__doc__, model=dict(name="mlp", hidden=(800,), activation="relu"),
        optimizer=dict(name="sgd", lr=1.0), batch_size=1024, epochs=30)


def mnist_cnn():
    """Exercise 1.2: conv 8-16-32 3x3 pad 1, ReLU then 2x2 max pool, linear; SGD lr 0.1, batch 32, 20 epochs (report: 99%)."""
    return base_config(
        "mnist_cnn", mnist_cnn.__doc__,
        model=dict(name="small_cnn", features=(8, 16, 32), activation="relu", pool_first=False),
        optimizer=dict(name="sgd", lr=0.1), batch_size=32, epochs=20)


EXPERIMENTS = {
    "mnist_fnn": mnist_fnn,
    "mnist_cnn": mnist_cnn,
    "mnist_cnn_pool_first": lambda: variant(mnist_cnn(), "mnist_cnn_pool_first",
                                            "Exercise 1.3: the CNN with max pooling before the ReLU.",
                                            **{"model.pool_first": True}),
    "mnist_cnn_tanh": lambda: variant(mnist_cnn(), "mnist_cnn_tanh", "Exercise 1.3: the CNN with tanh for ReLU.",
                                      **{"model.activation": "tanh"}),
    "mnist_cnn_adam": lambda: variant(mnist_cnn(), "mnist_cnn_adam", "Exercise 1.4: the CNN trained with Adam, lr 1e-3.",
                                      **{"optimizer.name": "adam", "optimizer.lr": 1e-3}),
}
