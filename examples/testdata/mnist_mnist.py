r"""Golden config of examples/mnist/config.py:mnist, resolved.

Written by jaxline.golden_configs; do not edit by hand.
"""

from ml_collections import config_dict


def get_config():
  config = config_dict.ConfigDict()
  config.best_checkpoint_all_hosts = False
  config.best_model_eval_metric = 'accuracy'
  config.best_model_eval_metric_higher_is_better = True
  config.checkpoint_allow_pickle = False  # jaxline default
  config.checkpoint_backend = 'disk'  # jaxline default
  config.checkpoint_dir = 'runs/mnist_mnist'
  config.checkpoint_interval_type = None
  config.eval_every_checkpoint = False  # jaxline default
  config.eval_initial_weights = False
  config.eval_poll_interval_secs = 1.0
  config.experiment_class = 'examples.mnist.experiment:Experiment'
  config.experiment_kwargs = config_dict.ConfigDict()
  config.experiment_kwargs.config = config_dict.ConfigDict()
  config.experiment_kwargs.config.batch_size = 128
  config.experiment_kwargs.config.data_dir = config_dict.placeholder(str)
  config.experiment_kwargs.config.dataset = 'mnist'
  config.experiment_kwargs.config.eval_batch_size = 1024
  config.experiment_kwargs.config.eval_split = 'test'
  config.experiment_kwargs.config.learning_rate = 0.001
  config.experiment_kwargs.config.model = config_dict.ConfigDict()
  config.experiment_kwargs.config.model.conv_channels = (32, 64)
  config.experiment_kwargs.config.model.conv_head_size = 128
  config.experiment_kwargs.config.model.kind = 'convnet'
  config.experiment_kwargs.config.model.mlp_hidden_sizes = (256, 256)
  config.experiment_kwargs.config.warmup_steps = 50
  config.experiment_kwargs.config.weight_decay = 0.0001
  config.experiment_style = 'pmap'  # jaxline default
  config.interval_type = 'steps'
  config.legacy_random_seed_behavior = False
  config.log_all_hosts = False
  config.log_all_train_data = False
  config.log_async = True
  config.log_tensors_interval = 50
  config.log_train_data_interval = 10.0
  config.logging_interval_type = None
  config.max_checkpoints_to_keep = 5
  config.one_off_evaluate = False
  config.periodic_action_growth_ratios = None
  config.preemption_grace_secs = 60.0  # jaxline default
  config.profile_num_steps = 5  # jaxline default
  config.profile_start_step = config_dict.placeholder(int)  # jaxline default
  config.random_mode_eval = 'same_host_same_device'
  config.random_mode_train = 'unique_host_unique_device'
  config.random_seed = 42
  config.save_checkpoint_interval = 500
  config.save_initial_train_checkpoint = False
  config.step_timeout_secs = config_dict.placeholder(float)  # jaxline default
  config.terminate_on_nan = True  # jaxline default
  config.train_checkpoint_all_hosts = False
  config.training_steps = 3000
  # Keys that share one value (FieldReferences): an override of one sets all.
  config.experiment_kwargs.config.training_steps = config.get_ref('training_steps')  # computed: linked to config.training_steps
  return config
