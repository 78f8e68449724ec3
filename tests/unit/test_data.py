import numpy as np
import pytest

from recsvc.data import IdMap, build_matrix, read_interactions


def test_csv_event_weights_and_negative_feedback(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text(
        "user_id,item_id,event_type\n"
        "alice,sku-1,view\n"
        "alice,sku-1,purchase\n"
        "alice,sku-2,view\n"
        "alice,sku-2,dislike\n"
        "bob,sku-3,Add-To-Cart\n"
    )
    m, users, items = build_matrix(read_interactions(path))
    assert users.ids == ["alice", "bob"] and items.ids == ["sku-1", "sku-2", "sku-3"]
    dense = m.toarray()
    assert dense[0, 0] == 9.0  # view 1 + purchase 8
    assert dense[0, 1] == 0.0  # view 1 + dislike -4: not a like
    assert dense[1, 2] == 4.0
    assert m.nnz == 2


def test_tsv_with_weight_value_and_rating(tmp_path):
    path = tmp_path / "log.tsv"
    path.write_text(
        "user_id\titem_id\tevent_type\tvalue\tweight\n"
        "u1\ti1\trating\t5\t\n"
        "u1\ti2\trating\t1\t\n"
        "u2\ti1\tview\t\t2.5\n"
    )
    m, users, items = build_matrix(read_interactions(path))
    dense = m.toarray()
    assert dense[users.index("u1"), items.index("i1")] == 2.0  # 1 * (5 - 3)
    assert dense[users.index("u1"), items.index("i2")] == 0.0  # 1 * (1 - 3) < 0
    assert dense[users.index("u2"), items.index("i1")] == 2.5  # weight column wins


def test_gowalla_line_format(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("0 0 1 2\n1 2 3\n2\n")
    m, users, items = build_matrix(read_interactions(path))
    assert users.ids == ["0", "1"] and items.ids == ["0", "1", "2", "3"]
    assert m.toarray().tolist() == [[1, 1, 1, 0], [0, 0, 1, 1]]


def test_bad_rows_name_their_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("user_id,item_id,event_type\nu,i,view\nu,i,teleport\n")
    with pytest.raises(ValueError, match=r"bad.csv:3: unknown event type 'teleport'"):
        read_interactions(path)
    path.write_text("user,item\nu,i\n")
    with pytest.raises(ValueError):
        read_interactions(path)
    path.write_text("item_id,user_id\n,u\n")
    with pytest.raises(ValueError, match=":2: empty"):
        read_interactions(path)


def test_id_map_round_trip(tmp_path):
    ids = IdMap(["b", "a", "sku with space"])
    ids.save(tmp_path / "ids.txt")
    loaded = IdMap.load(tmp_path / "ids.txt")
    assert loaded.ids == ids.ids
    assert loaded.indices(["a", "zz", "sku with space"]).tolist() == [1, -1, 2]
    with pytest.raises(ValueError):
        IdMap(["x", "x"])


def test_build_matrix_extends_existing_maps(tmp_path):
    path = tmp_path / "l.txt"
    path.write_text("u2 i9 i1\n")
    m, users, items = build_matrix(read_interactions(path), IdMap(["u1"]), IdMap(["i1"]))
    assert users.ids == ["u1", "u2"] and items.ids == ["i1", "i9"]
    assert np.asarray(m.sum(axis=1)).ravel().tolist() == [0, 2]


def test_catalogue_jsonl_and_csv(tmp_path):
    from recsvc.data import build_item_attributes, read_catalogue

    jsonl = tmp_path / "catalogue.jsonl"
    jsonl.write_text(
        '{"item_id": "s1", "category": "Shoes", "tags": ["red", "running"], "title": "Trail running shoe"}\n'
        '{"item_id": "s2", "categories": ["shoes"], "tags": "blue|running"}\n'
        '{"item_id": "h1", "category": "hats", "title": "The red cap"}\n'
    )
    cat = read_catalogue(jsonl)
    assert cat["s1"] == ["category:shoes", "tag:red", "tag:running", "word:trail",
                         "word:running", "word:shoe"]  # fmt: skip
    assert cat["h1"] == ["category:hats", "word:red", "word:cap"]
    csv_path = tmp_path / "catalogue.csv"
    csv_path.write_text("item_id,category,tags\ns1,shoes,red|running\ns2,shoes,blue\n")
    assert read_catalogue(csv_path)["s1"] == ["category:shoes", "tag:red", "tag:running"]

    matrix, vocab = build_item_attributes(IdMap(["s1", "s2", "h1", "x"]), cat)
    assert vocab.ids == ["category:shoes", "tag:running"]  # attributes of >= 2 items
    assert matrix.toarray().tolist() == [[1, 1], [1, 1], [0, 0], [0, 0]]
