import pandas as pd
import pytest

from htcl.pairs import PairsError, cooccurrence_pairs, favor_triplets, stage2_pairs

T = pd.Timestamp("2026-01-01", tz="UTC")


def interactions():
    return pd.DataFrame(
        {
            "user_id": [1, 1, 2, 2, 3],
            "trigger_song_id": [10, 10, 11, 12, 13],
            "rec_song_id": [20, 21, 11, 22, 23],
            "clicked": [True, True, True, False, True],
            "favored": [True, False, True, True, True],
            "event_timestamp": [T + pd.Timedelta(hours=h) for h in (5, 1, 2, 3, 0)],
        }
    )


def test_favor_triplets_keeps_clicked_favors_in_time_order():
    out = favor_triplets(interactions())
    # row 2 is a self-pair, row 3 a favor without a click, row 1 not favored
    assert out[["trigger_song_id", "rec_song_id"]].values.tolist() == [[13, 23], [10, 20]]


def test_cooccurrence_pairs_follow_sessions():
    sessions = pd.DataFrame(
        {
            "user_id": [1, 1, 1, 1, 2, 2],
            "session_id": [5, 5, 5, 6, 7, 7],
            "position": [2, 0, 1, 0, 0, 1],
            "song_id": [3, 1, 2, 9, 4, 4],
            "event_timestamp": [T + pd.Timedelta(minutes=m) for m in (2, 0, 1, 10, 20, 21)],
        }
    )
    out = cooccurrence_pairs(sessions)
    assert out[["trigger_song_id", "rec_song_id"]].values.tolist() == [[1, 2], [2, 3]]
    assert len(cooccurrence_pairs(sessions, window=2)) == 3


def test_missing_column_is_named():
    with pytest.raises(PairsError, match="favored"):
        favor_triplets(interactions().drop(columns=["favored"]))
    with pytest.raises(PairsError, match="variant"):
        stage2_pairs("clicks", interactions(), None)
