from twin.bench import last_json_object


def test_last_json_object_skips_chatter_and_nested_braces():
    text = 'progress {not json}\n{"a": 1}\nmore\n{"b": {"c": [1, 2]}, "d": "}"}\n'
    assert last_json_object(text + "\n") == {"b": {"c": [1, 2]}, "d": "}"}
