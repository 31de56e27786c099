r"""Golden config of examples/imagenet/config.py, resolved.

Written by jaxline.golden_configs; do not edit by hand.
"""

from ml_collections import config_dict


def get_config():
  config = config_dict.ConfigDict()
  config.best_checkpoint_all_hosts = False
  config.best_model_eval_metric = 'top_1_acc'
  config.best_model_eval_metric_higher_is_better = True
  config.checkpoint_allow_pickle = False  # jaxline default
  config.checkpoint_backend = 'disk'  # jaxline default
  config.checkpoint_dir = 'runs/imagenet'
  config.checkpoint_interval_type = None
  config.eval_every_checkpoint = False  # jaxline default
  config.eval_initial_weights = False
  config.eval_poll_interval_secs = 60.0
  config.experiment_class = 'examples.imagenet.experiment:Experiment'
  config.experiment_kwargs = config_dict.ConfigDict()
  config.experiment_kwargs.config = config_dict.ConfigDict()
  config.experiment_kwargs.config.dataset = config_dict.ConfigDict()
  config.experiment_kwargs.config.dataset.crop_area_range = (0.08, 1.0)
  config.experiment_kwargs.config.dataset.crop_aspect_ratio_range = (0.75, 1.3333333333333333)
  config.experiment_kwargs.config.dataset.crop_padding = 32
  config.experiment_kwargs.config.dataset.data_dir = config_dict.placeholder(str)
  config.experiment_kwargs.config.dataset.eval_split = 'validation'
  config.experiment_kwargs.config.dataset.image_size = 224
  config.experiment_kwargs.config.dataset.mean_rgb = (123.675, 116.28, 103.53)
  config.experiment_kwargs.config.dataset.name = 'imagenet2012'
  config.experiment_kwargs.config.dataset.num_classes = 1000
  config.experiment_kwargs.config.dataset.num_train_examples = 1281167
  config.experiment_kwargs.config.dataset.shuffle_buffer_size = 10000
  config.experiment_kwargs.config.dataset.stddev_rgb = (58.395, 57.120000000000005, 57.375)
  config.experiment_kwargs.config.dataset.train_split = 'train'
  config.experiment_kwargs.config.evaluation = config_dict.ConfigDict()
  config.experiment_kwargs.config.evaluation.batch_size = 1024
  config.experiment_kwargs.config.evaluation.eval_every_epochs = 10
  config.experiment_kwargs.config.model = config_dict.ConfigDict()
  config.experiment_kwargs.config.model.blocks_per_group = (3, 4, 6, 3)
  config.experiment_kwargs.config.model.bn_decay_rate = 0.9
  config.experiment_kwargs.config.model.bottleneck = True
  config.experiment_kwargs.config.model.channels_per_group = (256, 512, 1024, 2048)
  config.experiment_kwargs.config.model.resnet_v2 = False
  config.experiment_kwargs.config.optimizer = config_dict.ConfigDict()
  config.experiment_kwargs.config.optimizer.base_batch_size = 256
  config.experiment_kwargs.config.optimizer.base_learning_rate = 0.1
  config.experiment_kwargs.config.optimizer.end_learning_rate = 0.0
  config.experiment_kwargs.config.optimizer.momentum = 0.9
  config.experiment_kwargs.config.optimizer.nesterov = False
  config.experiment_kwargs.config.optimizer.peak_learning_rate = 0.4  # computed from config.experiment_kwargs.config.optimizer.base_batch_size, config.experiment_kwargs.config.optimizer.base_learning_rate, config.experiment_kwargs.config.training.batch_size
  config.experiment_kwargs.config.optimizer.warmup_epochs = 5
  config.experiment_kwargs.config.optimizer.warmup_steps = 6255  # computed from config.experiment_kwargs.config.optimizer.warmup_epochs, config.experiment_kwargs.config.training.steps_per_epoch
  config.experiment_kwargs.config.optimizer.weight_decay = 0.0001
  config.experiment_kwargs.config.training = config_dict.ConfigDict()
  config.experiment_kwargs.config.training.batch_size = 1024
  config.experiment_kwargs.config.training.bf16 = False
  config.experiment_kwargs.config.training.label_smoothing = 0.1
  config.experiment_kwargs.config.training.num_epochs = 90
  config.experiment_kwargs.config.training.steps_per_epoch = 1251  # computed from config.experiment_kwargs.config.dataset.num_train_examples, config.experiment_kwargs.config.training.batch_size
  config.experiment_style = 'pmap'  # jaxline default
  config.interval_type = 'steps'
  config.legacy_random_seed_behavior = False
  config.log_all_hosts = False
  config.log_all_train_data = False
  config.log_async = True
  config.log_tensors_interval = 500
  config.log_train_data_interval = 100.0
  config.logging_interval_type = None
  config.max_checkpoints_to_keep = 10
  config.one_off_evaluate = False
  config.periodic_action_growth_ratios = None
  config.preemption_grace_secs = 60.0  # jaxline default
  config.profile_num_steps = 5  # jaxline default
  config.profile_start_step = config_dict.placeholder(int)  # jaxline default
  config.random_mode_eval = 'same_host_same_device'
  config.random_mode_train = 'unique_host_unique_device'
  config.random_seed = 42
  config.save_checkpoint_interval = 12510  # computed from config.experiment_kwargs.config.evaluation.eval_every_epochs, config.experiment_kwargs.config.training.steps_per_epoch
  config.save_initial_train_checkpoint = False
  config.step_timeout_secs = config_dict.placeholder(float)  # jaxline default
  config.terminate_on_nan = True  # jaxline default
  config.train_checkpoint_all_hosts = False
  config.training_steps = 112590  # computed from config.experiment_kwargs.config.training.num_epochs, config.experiment_kwargs.config.training.steps_per_epoch
  # Keys that share one value (FieldReferences): an override of one sets all.
  config.experiment_kwargs.config.training.training_steps = config.get_ref('training_steps')  # computed: linked to config.training_steps
  return config
