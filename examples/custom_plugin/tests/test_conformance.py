"""The plugin's own tests: hydraserve's conformance kit says whether it keeps the plugin contract.

Run with `pytest examples/custom_plugin/tests` once the package is installed (`pip install ./examples/custom_plugin`).
"""

from hydraserve_example_plugin.reverse import ReverseConfig, ReverseModel

from framework.testing import check_model_plugin


def test_reverse_conforms():
    check_model_plugin(ReverseModel(), good_bodies=[{"input": "abc"}, {"input": ["hello", "hydraserve"]}],
                       bad_bodies=[{}, {"input": 3}, {"input": []}, {"input": ["x" * 20_000]}])


def test_reverse_uppercase_conforms():
    check_model_plugin(ReverseModel(ReverseConfig(uppercase=True)), good_bodies=[{"input": "abc"}])
