"""Sharding support that needs no process group: 0-dim parameters, the FSDP auto-wrap policy through the wrapper,
plugin state that never holds student weights (the multi-process runs are in test_fsdp.py / test_deepspeed.py)."""

import pytest
from contract_cases import load_case
from contract_cases.lingudistill import tiny_llava
from contract_cases.msd import tiny_clip

import vlmdistill
from vlmdistill.sharding import block_class_names

PLUGINS = vlmdistill.list_plugins()


def _wrapped(plugin):
    case = load_case(plugin)
    student = case.make_student()
    return student, vlmdistill.wrap(student, plugin=plugin, teacher=case.make_teacher(student),
                                    config=dict(case.config), **case.runtime)


def test_scalar_parameters_are_one_element_while_wrapped_and_keep_their_shape_in_state_dicts():
    student = tiny_clip()
    scale = student.logit_scale
    value = float(scale.detach())
    wrapped = vlmdistill.wrap(student, plugin="msd", temperature=0.07, queue_size=0)
    # FSDP2 shards along dim 0: the same Parameter object, now of shape [1] (as is msd's own temperature)
    assert student.logit_scale is scale and scale.shape == (1,) and wrapped.plugin.temp.shape == (1,)
    assert student.state_dict()["logit_scale"].shape == ()
    assert wrapped.state_dict()["plugin.temp"].shape == ()
    assert wrapped.plugin.hidden_state()["teacher.logit_scale"].shape == ()  # the EMA copy, too
    wrapped.load_state_dict(wrapped.state_dict())  # 0-dim values load into the 1-element parameters
    restored = vlmdistill.unwrap(wrapped)
    assert restored.logit_scale is scale and scale.shape == () and float(scale.detach()) == value


def test_llava_wrapper_gives_accelerate_block_classes_it_contains():
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    student = tiny_llava()
    listed = student._no_split_modules
    present = {type(m).__name__ for m in student.modules()}
    assert set(listed) - present, "LLaVA lists a block class it does not contain (the case accelerate refuses)"
    wrapped = vlmdistill.wrap(student, plugin="lingudistill", teacher=load_case("lingudistill").make_teacher(student))
    # the decoder and vision-encoder layers: blocks it contains, no embedding modules
    assert set(wrapped._no_split_modules) == set(block_class_names(student)) == {"LlamaDecoderLayer",
                                                                                  "CLIPEncoderLayer"}
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    policy = fsdp2_prepare_auto_wrap_policy(plugin, wrapped)
    decoder_layers = list(student.model.language_model.layers)
    assert decoder_layers and all(policy(layer) for layer in decoder_layers)
    assert not policy(wrapped) and not policy(student.lm_head)


@pytest.mark.parametrize("plugin", PLUGINS)
def test_plugin_state_holds_no_student_weights(plugin):
    student, wrapped = _wrapped(plugin)
    student_storage = {t.untyped_storage().data_ptr() for t in (*student.parameters(), *student.buffers())}
    plugin_state = wrapped.plugin.state_dict()
    shared = [k for k, v in plugin_state.items() if v.numel() and v.untyped_storage().data_ptr() in student_storage]
    assert not shared, f"plugin state re-saves student tensors: {shared[:5]}"
    assert not [k for k in plugin_state if k.startswith("_")], "plugin state holds private submodules"


@pytest.mark.parametrize("name,kind", [("fsdp2-1x8.yaml", "FSDP"), ("zero3-1x8.yaml", "DEEPSPEED")])
def test_accelerate_configs_for_one_node_of_eight_gpus_load(name, kind):
    import os

    from accelerate.commands.config.config_args import load_config_from_file

    path = os.path.join(os.path.dirname(__file__), "..", "configs", "accelerate", name)
    config = load_config_from_file(path)
    assert config.distributed_type.name == kind and config.num_processes == 8
    if kind == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    else:
        assert config.deepspeed_config["zero_stage"] == 3 and config.deepspeed_config["zero3_save_16bit_model"]


def test_recipe_distributed_block_becomes_trainer_arguments():
    from vlmdistill.errors import ConfigError
    from vlmdistill.recipes import DistributedSpec, Recipe

    fsdp = DistributedSpec.from_dict({"strategy": "fsdp2", "teacher": "shard", "state_dict_type": "FULL_STATE_DICT"})
    args = fsdp.training_arguments()
    assert args["fsdp"] is True and args["fsdp_config"]["version"] == 2
    assert args["fsdp_config"]["state_dict_type"] == "FULL_STATE_DICT"
    zero3 = DistributedSpec.from_dict({"strategy": "zero3", "cpu_offload": True,
                                       "deepspeed": {"zero_optimization": {"overlap_comm": True}}})
    config = zero3.training_arguments()["deepspeed"]
    assert config["zero_optimization"]["stage"] == 3 and config["zero_optimization"]["overlap_comm"]
    assert config["zero_optimization"]["offload_param"] == {"device": "cpu"}
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    with pytest.raises(ConfigError, match="strategy"):
        DistributedSpec.from_dict({"strategy": "fsdp1"})
    base = {"plugin": "kd", "student": {"builder": "from-config"}, "data": {"builder": "text-blocks"}}
    with pytest.raises(ConfigError, match="both configure sharding"):
        Recipe.from_dict({**base, "training": {"deepspeed": "ds.json"}, "distributed": {"strategy": "zero3"}})
