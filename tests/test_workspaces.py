"""RecentWorkspaces: one workspace per key, made once, and only the few made last kept."""
from memwise.kernels.workspaces import RecentWorkspaces


def test_made_once_per_key_and_the_oldest_dropped():
    made = []

    def maker(key):
        def make():
            made.append(key)
            return f"ws{key}"
        return make

    workspaces = RecentWorkspaces(keep=2)
    assert workspaces.get(1, maker(1)) == "ws1"
    assert workspaces.get(1, maker(1)) == "ws1"
    assert made == [1]
    workspaces.get(2, maker(2))
    workspaces.get(3, maker(3))         # 1 is dropped
    assert len(workspaces) == 2 and made == [1, 2, 3]
    assert workspaces.get(2, maker(2)) == "ws2" and made == [1, 2, 3]
    assert workspaces.get(1, maker(1)) == "ws1" and made == [1, 2, 3, 1]
