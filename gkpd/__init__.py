"""gkpd: Generalized Kronecker Product Decomposition of conv and linear layers (arXiv 2109.14710)."""

from gkpd.convert import (
    PLAN_FORMAT, PLAN_VERSION, LayerInfo, Plan, check_plan, compressible_layers, kroneckerize, load_plan,
    plan_from_dict, plan_to_dict, save_plan, spec_to_dict,
)
from gkpd.cost import count_macs, count_mflops, count_params, layer_cost
from gkpd.decompose import (
    cp_als, decompose, error_spectrum, fit_error, rearrange, rearrange_n, reconstruct, singular_values, unrearrange,
    unrearrange_n,
)
from gkpd.functional import factorized_conv2d, kronecker_conv2d, kronecker_linear, materialized_conv2d
from gkpd.layers import FACTOR_NAMES, KroneckerConv2d, KroneckerLinear, set_path, use_path
from gkpd.spec import ConvGeometry, KroneckerSpec

__all__ = [
    "KroneckerSpec", "ConvGeometry",
    "rearrange", "unrearrange", "rearrange_n", "unrearrange_n", "decompose", "reconstruct", "singular_values",
    "error_spectrum", "fit_error", "cp_als",
    "kronecker_conv2d", "kronecker_linear", "factorized_conv2d", "materialized_conv2d",
    "KroneckerConv2d", "KroneckerLinear", "FACTOR_NAMES", "set_path", "use_path",
    "Plan", "LayerInfo", "compressible_layers", "kroneckerize", "check_plan",
    "save_plan", "load_plan", "plan_to_dict", "plan_from_dict", "spec_to_dict", "PLAN_FORMAT", "PLAN_VERSION",
    "count_macs", "count_mflops", "count_params", "layer_cost",
]
