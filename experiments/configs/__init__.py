"""The official pre-training setups of the seed papers, one file per method.

Each file's ``get_config(arg)`` returns a frozen :class:`jqlm.train.TrainConfig`
with the hyper-parameters of ``../shared/spec/optimizers.md`` (cited per
file); ``jqlm train --config experiments/configs/<file>.py:<arg>`` runs it.
"""
