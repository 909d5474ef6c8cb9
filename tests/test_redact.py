"""The scrubber: every spelling of a credential-bearing parameter goes, the text around it stays, and scrubbing a
rendered JSON line keeps it valid JSON."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from retrain_uploader.redact import redact_url, register_secret, scrub, scrub_values

SIG_VALUE = "5ec2e7Zq9"  # stands for a signature, credential or token value


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # the report: a JSON-escaped presigned URL in an excerpt of a truncated 200 body
        (
            '"upload_url":"https:\\/\\/s3.example\\/b\\/k.csv?X-Amz-Signature=5ec2e7Zq9',
            '"upload_url":"https:\\/\\/s3.example\\/b\\/k.csv?<redacted>',
        ),
        ("https://s3.example/b/k.csv?X-Amz-Signature=5ec2e7Zq9 next", "https://s3.example/b/k.csv?<redacted> next"),
        # escaped `?`, `=` and `&` (Go and some JSON encoders write \u0026), once or twice escaped
        (
            "https:\\/\\/h\\/k\\u003fX-Amz-Signature\\u003d5ec2e7Zq9\\u0026X-Amz-Date=1",
            "https:\\/\\/h\\/k\\u003f<redacted>\\u003d<redacted>\\u0026X-Amz-Date=1",
        ),
        ("a=1\\u0026X-Amz-Signature=5ec2e7Zq9\\u0026b=2", "a=1\\u0026X-Amz-Signature=<redacted>\\u0026b=2"),
        ("a=1\\\\u0026sig=5ec2e7Zq9\\\\u0026b=2", "a=1\\\\u0026sig=<redacted>\\\\u0026b=2"),
        # percent-encoded: a presigned URL inside another URL's query, or a parameter on its own
        ("next=https%3A%2F%2Fh%2Fk%3FX-Amz-Signature%3D5ec2e7Zq9 end", "next=https%3A%2F%2Fh%2Fk%3F<redacted> end"),
        ("X-Amz-Signature%3D5ec2e7Zq9%26X-Amz-Date%3D1", "X-Amz-Signature%3D<redacted>%26X-Amz-Date%3D1"),
        ("X-Amz-Signature%253D5ec2e7Zq9%2526b", "X-Amz-Signature%253D<redacted>%2526b"),
        # HTML-escaped ampersands and entities
        ("k.csv?a=1&amp;Signature=5ec2e7Zq9&amp;Expires=9", "k.csv?a=1&amp;Signature=<redacted>&amp;Expires=9"),
        ("Signature&#61;5ec2e7Zq9&amp;x", "Signature&#61;<redacted>&amp;x"),
        # upper and lower case
        ("X-AMZ-SIGNATURE=5ec2e7Zq9&x-amz-sig=5ec2e7Zq9", "X-AMZ-SIGNATURE=<redacted>&x-amz-sig=<redacted>"),
        # AWS: credential, session token, the v2 access key id; CloudFront: Signature and Key-Pair-Id, not Expires
        ("X-Amz-Credential=AKIA%2F5ec2e7Zq9%2Fs3&b=1", "X-Amz-Credential=<redacted>&b=1"),
        ("X-Amz-Security-Token=5ec2e7Zq9&b=1", "X-Amz-Security-Token=<redacted>&b=1"),
        ("AWSAccessKeyId=5ec2e7Zq9&Expires=9", "AWSAccessKeyId=<redacted>&Expires=9"),
        (
            "Expires=9&Signature=5ec2e7Zq9~-_&Key-Pair-Id=K5ec2e7Zq9",
            "Expires=9&Signature=<redacted>&Key-Pair-Id=<redacted>",
        ),
        # Azure SAS (base64, percent-encoded), GCS
        ("sv=2024&sig=5ec2e7Zq9%2B%2F%3D&se=2026", "sv=2024&sig=<redacted>&se=2026"),
        (
            "X-Goog-Signature=5ec2e7Zq9&X-Goog-Credential=sa%405ec2e7Zq9",
            "X-Goog-Signature=<redacted>&X-Goog-Credential=<redacted>",
        ),
        ("GoogleAccessId=5ec2e7Zq9&Signature=5ec2e7Zq9", "GoogleAccessId=<redacted>&Signature=<redacted>"),
        # an Authorization header, a header dump, a JSON object, a Python dict repr
        (
            "Credential=AKIA/5ec2e7Zq9/s3/aws4_request, SignedHeaders=host, Signature=5ec2e7Zq9",
            "Credential=<redacted>, SignedHeaders=host, Signature=<redacted>",
        ),
        ("x-amz-security-token: 5ec2e7Zq9\n", "x-amz-security-token: <redacted>\n"),
        ('{"X-Amz-Signature": "5ec2e7Zq9", "n": 1}', '{"X-Amz-Signature": "<redacted>", "n": 1}'),
        ("{'sig': '5ec2e7Zq9'}", "{'sig': '<redacted>'}"),
        # a credential in a repr or a quoted assignment (seen by review: leaked before)
        ("Proxy(user='u', password='5ec2e7Zq9')", "Proxy(user='u', password='<redacted>')"),
        ('token="5ec2e7Zq9" next', 'token="<redacted>" next'),
        ('"error": "proxy password=\\"5ec2e7Zq9\\""', '"error": "proxy password=\\"<redacted>\\""'),
        # an Authorization header's credentials after its scheme, in a header, a dict's repr or JSON
        ("Authorization: Bearer 5ec2e7Zq9", "Authorization: Bearer <redacted>"),
        ("{'Proxy-Authorization': 'Basic 5ec2e7Zq9'}", "{'Proxy-Authorization': 'Basic <redacted>'}"),
        ('{"authorization": "5ec2e7Zq9"}', '{"authorization": "<redacted>"}'),
    ],
)
def test_every_spelling_of_a_signature_parameter_is_scrubbed(text: str, expected: str) -> None:
    assert scrub(text) == expected
    assert SIG_VALUE not in scrub(text)
    assert scrub(scrub(text)) == scrub(text)  # a second pass (value, then the rendered line) changes nothing


@pytest.mark.parametrize(
    "text",
    [
        "design=final signal=9 SignedHeaders=host Expires=9 X-Amz-Date=20261201 filename=sig.csv",
        'the signature we calculated does not match; "token": 3',
        "https://api.example/v1/retrain/0f3a",
        "basic validation passed; a bearer of news; authorization failed",
    ],
)
def test_look_alikes_are_kept(text: str) -> None:
    assert scrub(text) == text


def test_registered_secrets_are_scrubbed_in_their_escaped_spellings_too() -> None:
    register_secret('k3y/with"quote+')
    text = 'plain k3y/with"quote+ json "k3y/with\\"quote+" url k3y%2Fwith%22quote%2B'
    assert scrub(text) == 'plain <redacted> json "<redacted>" url <redacted>'
    assert scrub("per call: abcd-1234", ["abcd-1234"]) == "per call: <redacted>"


def test_redact_url_keeps_the_address_only() -> None:
    assert redact_url("https://h/b/k.csv?X-Amz-Signature=s") == "https://h/b/k.csv?<redacted>"
    assert redact_url("https://h/b/k.csv") == "https://h/b/k.csv"


_SECRET_BEARING = [
    "https://h/b/k.csv?X-Amz-Signature=5ec2e7Zq9",
    "https:\\/\\/h\\/k?sig=5ec2e7Zq9",
    "\\u0026X-Goog-Signature\\u003d5ec2e7Zq9",
    "%26Signature%3D5ec2e7Zq9",
    "&amp;sig=5ec2e7Zq9",
    '"X-Amz-Credential": "5ec2e7Zq9"',
    "token: 5ec2e7Zq9",
]
_ODD = ['"', "\\", "'", "<", "&", "?", "=", "%", ":", "\udcff", "\u3042"]
# Between two pieces, what separates parameters or words in real text (so one value cannot swallow the next name).
_SEPARATORS = [" ", "\n", "&", "\\u0026", "%26", ",", '"', "'"]


@given(
    st.lists(
        st.tuples(
            st.one_of(st.sampled_from(_SECRET_BEARING + _ODD), st.text(max_size=8)), st.sampled_from(_SEPARATORS)
        ),
        max_size=10,
    )
)
def test_a_scrubbed_json_line_is_still_json_and_holds_no_signature(parts: list[tuple[str, str]]) -> None:
    value = "".join(piece + sep for piece, sep in parts)
    line = json.dumps({"event": "x", "error": value, "n": 3}, ensure_ascii=False)
    scrubbed = scrub(line)
    record = json.loads(scrubbed)  # still one valid JSON object, with its other fields intact
    assert (record["event"], record["n"]) == ("x", 3)
    assert SIG_VALUE not in scrubbed
    assert scrub(scrubbed) == scrubbed


@pytest.mark.parametrize(
    "name",
    [
        "X-Amz-\u017fignature",  # long s: IGNORECASE takes it for s
        "X-Amz-S\u0131gnature",  # dotless i
        "X-Amz-S\u0130gnature",  # dotted capital I
        "x-api-\u212aey",  # Kelvin sign for k
        "ACCESS_TOKEN",
    ],
)
def test_a_line_is_scrubbed_whatever_case_its_parameter_name_takes(name: str) -> None:
    # Most lines skip the patterns by a cheap pre-check for their keywords; it must let through every spelling the
    # patterns themselves (case-insensitive, Unicode) would take.
    line = json.dumps({"event": "upload.retry_scheduled", "error": f"failed: {name}={SIG_VALUE}&b=1"},
                      ensure_ascii=False)
    out = scrub(line)
    assert SIG_VALUE not in out and json.loads(out)["error"] == f"failed: {name}=<redacted>&b=1"


@given(
    st.lists(
        st.lists(st.one_of(st.sampled_from(_SECRET_BEARING + _ODD + _SEPARATORS), st.text(max_size=6)), max_size=6),
        max_size=5,
    )
)
def test_scrubbing_a_lines_values_together_changes_each_as_scrubbing_it_alone(values: list[list[str]]) -> None:
    # scrub_values looks at all of a line's values at once (joined by newlines) and scrubs each only if that found
    # something: never a value left as it was that scrubbing it alone would have changed.
    event: dict[str, object] = {f"k{i}": "".join(parts) for i, parts in enumerate(values)}
    event["n"] = 3
    expected = {key: scrub(value) if isinstance(value, str) else value for key, value in event.items()}
    assert scrub_values(None, "info", dict(event)) == expected
