"""unimp_jax: UniMP (multi-modal personalization with one vision-language model) in JAX/Flax NNX."""

from setuptools import find_packages, setup

# Versions known to work together; change them together and rerun the tests.
INSTALL_REQUIRES = [
    'jax==0.10.2',
    'jaxlib==0.10.2',
    'flax==0.12.8',
    'optax==0.2.8',
    'orbax-checkpoint==0.12.8',
    'grain==0.2.18',
    'tensorstore==0.1.86',
    'ml_collections==1.1.0',
    'absl-py==2.5.1',
    'numpy==2.4.6',
    'transformers==5.24.0',
    'tokenizers==0.23.3',
    'safetensors==0.8.0',
    'pillow==13.0.0',
    'tqdm==4.70.1',
    'tensorboardX==2.6.5',
    'matplotlib==3.11.2',
    'sacrebleu==2.6.0',
    'rouge-score==0.1.2',
    'dm-pix==0.4.5',
]

EXTRAS_REQUIRE = {
    'test': ['pytest==9.2.0', 'pytest-xdist==3.8.0'],  # the suite runs in 2 processes (README)
    # Hugging Face parity tests and export checks run transformers' PyTorch modules. Exactly this
    # version: it is a CPU build; any other pulls a multi-GB CUDA build.
    'hf': ['torch==2.13.0'],
    # Accelerators (launch/): the TPU runtime (libtpu), or CUDA 12 wheels, for the pinned jax.
    'tpu': ['jax[tpu]==0.10.2'],
    'cuda12': ['jax[cuda12]==0.10.2'],
}

setup(
    name='unimp_jax',
    version='0.1.0',
    description='UniMP: unified multi-modal personalization with a vision-language model, in JAX.',
    packages=find_packages(include=['unimp_jax', 'unimp_jax.*']),
    package_data={'unimp_jax.data': ['assets/fashion_mnist/*', 'assets/fashion_mnist_captions/*']},
    python_requires='>=3.11',
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
