"""Train, validate, test or sample with a YAML recipe.

    python train.py fit -c configs/transparent_vae.yaml -c configs/demo/transparent_vae.yaml
    python train.py fit -c configs/transparent_vae.yaml --print_config
    python train.py fit --help
"""

from layerdiff.cli import main

if __name__ == "__main__":
    main()
