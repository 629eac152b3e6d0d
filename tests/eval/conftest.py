"""The tiny OwlEval folder that the answering and judging tests share."""

import pytest

from helpers import make_owleval


@pytest.fixture(scope="module")
def owleval_dir(tmp_path_factory):
    return make_owleval(tmp_path_factory.mktemp("owleval"))
