"""From a job's config to the model it trains: ``checks`` says up front what cannot work (one
line per problem, exit 2), ``model`` builds it on the meta device, parallelises it in the fixed
order and loads its weights."""

from titan_lite.build.checks import check_job, parse_or_exit
from titan_lite.build.model import (
    FitError,
    build_finetuned_model,
    build_meta_model,
    build_model,
    check_model_fits,
    load_pretrained,
    parallelize,
)

__all__ = ["FitError", "build_finetuned_model", "build_meta_model", "build_model",
           "check_job", "check_model_fits", "load_pretrained", "parallelize", "parse_or_exit"]
