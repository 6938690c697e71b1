"""Weight initialisations of the reports' PyTorch networks, for flax parameters.

The reports' learning rates were tuned for these starts (SGD lr 1 for the MNIST FNN), and a 16-conv VGG
trains from torchvision's start but stays at chance from PyTorch's default (see the README).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

# torch.nn.Linear/Conv2d: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_kernel_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def torch_bias_init(fan_in):
    """PyTorch's default bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in of the layer's weight."""
    bound = 1 / jnp.sqrt(float(fan_in))  # a float: an int fan-in past 2**31 (a huge --input-shape) overflows
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


# torchvision's ResNet and VGG convs (`_initialize_weights`): kaiming-normal over fan-out with ReLU's gain.
torchvision_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torchvision's VGG linear layers: N(0, 0.01), zero biases.
torchvision_vgg_dense_init = nn.initializers.normal(0.01)

# A layer stack's weight initialisations: PyTorch's default, or torchvision's VGG (convs and dense weights as
# above, zero biases).
WEIGHT_INITS = ("torch", "vgg")


def param_inits(weight_init, kind, fan_in):
    """(kernel init, bias init) of a "conv" or "dense" layer under one of `WEIGHT_INITS`."""
    if weight_init == "vgg":
        return (torchvision_conv_init if kind == "conv" else torchvision_vgg_dense_init), nn.initializers.zeros
    return torch_kernel_init, torch_bias_init(fan_in)
