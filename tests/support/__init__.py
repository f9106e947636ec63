"""What the tests share: a quiet trainer, the one ``train.py`` launcher, callbacks that
instrument runs (importable in ``train.py`` subprocesses, which get ``tests/`` on
``PYTHONPATH``) and the contract every objective module passes (``support.contracts``)."""
