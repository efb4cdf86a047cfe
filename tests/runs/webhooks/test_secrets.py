"""The webhook secret's crypto: GitHub's published signature vector, sealing bound to its org and project."""

from __future__ import annotations

import pickle
import uuid

import pytest

from keys.crypto import DecryptionError, Secret
from runs.webhooks.secrets import (
    signature_for,
    signature_matches,
    webhook_secret_generate,
    webhook_secret_open,
    webhook_secret_seal,
)

# docs.github.com/webhooks/using-webhooks/validating-webhook-deliveries
VECTOR_SECRET = "It's a Secret to Everybody"
VECTOR_BODY = b"Hello, World!"
VECTOR_SIGNATURE = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"


def test_githubs_published_vector_verifies():
    secret = Secret(VECTOR_SECRET)
    assert signature_for(secret=secret, body=VECTOR_BODY) == VECTOR_SIGNATURE
    assert signature_matches(candidates=[secret], body=VECTOR_BODY, header=VECTOR_SIGNATURE)
    assert signature_matches(
        candidates=[secret], body=VECTOR_BODY, header=VECTOR_SIGNATURE.upper().replace("SHA", "sha")
    )


def test_a_body_changed_by_one_character_fails():
    assert not signature_matches(candidates=[Secret(VECTOR_SECRET)], body=b"Hello, World?", header=VECTOR_SIGNATURE)


@pytest.mark.parametrize(
    "header",
    [
        "",
        VECTOR_SIGNATURE[len("sha256=") :],
        "sha1=" + VECTOR_SIGNATURE[len("sha256=") :],
        "SHA256=" + VECTOR_SIGNATURE[len("sha256=") :],
        VECTOR_SIGNATURE[:-1],
        VECTOR_SIGNATURE + "0",
        VECTOR_SIGNATURE[:-1] + "z",
        " " + VECTOR_SIGNATURE,
        VECTOR_SIGNATURE + "\n",
    ],
)
def test_malformed_signatures_never_verify(header):
    assert not signature_matches(candidates=[Secret(VECTOR_SECRET)], body=VECTOR_BODY, header=header)


def test_any_candidate_may_sign_and_an_empty_secret_signs_nothing():
    empty = Secret("")
    header = signature_for(secret=empty, body=VECTOR_BODY)
    assert not signature_matches(candidates=[empty], body=VECTOR_BODY, header=header)
    both = [Secret("the new one"), Secret(VECTOR_SECRET)]
    assert signature_matches(candidates=both, body=VECTOR_BODY, header=VECTOR_SIGNATURE)
    assert not signature_matches(candidates=[], body=VECTOR_BODY, header=VECTOR_SIGNATURE)


def test_generated_secrets_are_high_entropy_and_never_show_themselves():
    secret = webhook_secret_generate()
    assert len(secret.reveal()) >= 43  # 32 random bytes, base64url
    assert secret.reveal() != webhook_secret_generate().reveal()
    assert secret.reveal() not in repr(secret)
    assert secret.reveal() not in f"{secret}"
    with pytest.raises(TypeError):
        pickle.dumps(secret)


def test_sealed_secret_opens_only_for_its_org_and_project(settings):
    from tests.keys.conftest import make_ring

    settings.KEYRING = make_ring(1)
    org, project = uuid.uuid4(), uuid.uuid4()
    secret = webhook_secret_generate()
    sealed = webhook_secret_seal(org_id=org, project_id=project, secret=secret)
    assert secret.reveal() not in sealed
    assert webhook_secret_open(org_id=org, project_id=project, sealed=sealed).reveal() == secret.reveal()
    assert webhook_secret_open(org_id=str(org).upper(), project_id=project, sealed=sealed).reveal() == secret.reveal()
    for other_org, other_project in ((uuid.uuid4(), project), (org, uuid.uuid4()), (project, org)):
        with pytest.raises(DecryptionError) as caught:
            webhook_secret_open(org_id=other_org, project_id=other_project, sealed=sealed)
        assert secret.reveal() not in str(caught.value)
    settings.KEYRING = make_ring(2)  # a keyring without the sealing kid
    with pytest.raises(DecryptionError):
        webhook_secret_open(org_id=org, project_id=project, sealed=sealed)
