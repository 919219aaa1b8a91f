"""Fixtures the containerd modules share: the images, built once per run."""

from __future__ import annotations

import pytest

from tests.containerd.images import ImageSet, build_images


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> ImageSet:
    return build_images(tmp_path_factory.mktemp("ctr-images"))
