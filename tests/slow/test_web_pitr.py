"""The page on a private cluster: its point-in-time recovery timeline in a real browser, with
PITR (issue 24): bases, archived WAL and drills drawn; a drill of a random instant started
from the page and shown on its base; an instant picked by clicking the timeline and
restored over a damaged database after a confirmation naming it; and the restore dialog's
choice to restore beside the live database (issue 25)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from api.app import create_app
from shared.config import Settings, parse_settings
from tests.conftest import token
from tests.support.browser import ARTIFACTS, backed_up_on_the_page, open_page
from tests.support.pgcluster import Cluster
from tests.support.pitr import app_cluster, app_config, committed_and_archived, rows

pytestmark = pytest.mark.timeout(400)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with app_cluster() as c:
        yield c


@pytest.fixture
def settings(cluster: Cluster, prefix: str, tmp_path: Path) -> Settings:
    return parse_settings(app_config(cluster, prefix, tmp_path), {}, base=tmp_path,
                          source="<test>")


async def test_the_timeline_drills_and_restores_to_a_picked_instant(
        aiohttp_server: Any, settings: Settings, redis: Any, worker: Any, api: Any,
        browser: Any, cluster: Cluster) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    await committed_and_archived(api, cluster, 1)
    server = await aiohttp_server(create_app(settings))
    base = str(server.make_url("")).rstrip("/")
    context, page, problems = await open_page(browser, base, token(settings, "admin"))
    await page.click("#targets a:text('main')")
    await page.wait_for_selector("#pitr-timeline rect.wal")
    assert (await page.text_content("#pitr-summary") or "").startswith("Recoverable from")
    assert await page.locator("#pitr-timeline line.base").count() == 1

    await page.click("#pitr-drill")  # a drill of a random instant, shown on its base
    drill = page.locator("#jobs tbody tr[data-status=succeeded]", has_text="verify")
    await drill.first.wait_for(timeout=240_000)
    await page.click("#targets a:text('main')")
    await page.wait_for_selector("#pitr-timeline circle.drill-passed")

    cluster.psql("DROP VIEW v; DROP TABLE t", db="app")  # the damage, after the window's end
    box = await page.locator("#pitr-timeline").bounding_box()
    assert box is not None
    await page.mouse.click(box["x"] + box["width"] * 0.995, box["y"] + box["height"] / 2)
    picked = await page.input_value("#pitr-at")
    assert picked.endswith("Z"), picked  # clamped into the window
    await page.wait_for_selector("#pitr-timeline line.pick", state="attached")
    await page.screenshot(path=str(ARTIFACTS / "web-6-pitr-timeline.png"), full_page=True)
    await page.click("#pitr-form button[type=submit]")
    text = await page.text_content("#confirm-text") or ""
    assert picked in text and '"main"' in text and "safety backup" in text
    await page.click("#confirm-ok")
    restored = page.locator("#jobs tbody tr[data-status=succeeded]", has_text="restore")
    await restored.first.wait_for(timeout=240_000)
    assert await rows(cluster) == [1]
    assert problems == []
    await context.close()

    # a viewer sees the timeline, not the buttons
    context, page, problems = await open_page(browser, base, token(settings, "viewer"))
    await page.click("#targets a:text('main')")
    await page.wait_for_selector("#pitr-timeline rect.wal")
    assert not await page.is_visible("#pitr-form")
    assert problems == []
    await context.close()


async def test_the_restore_dialog_restores_beside_the_live_database(
        aiohttp_server: Any, settings: Settings, redis: Any, worker: Any, api: Any,
        browser: Any, cluster: Cluster) -> None:
    """The restore dialog's other choice: beside the live database, as a new one named in
    the dialog, the plan in words following the choice; the live database is untouched."""
    cluster.psql("INSERT INTO t VALUES (1, now()), (2, now())", db="app")
    server = await aiohttp_server(create_app(settings))
    context, page, problems, row = await backed_up_on_the_page(
        browser, str(server.make_url("")).rstrip("/"), token(settings, "admin"))
    name = await row.get_attribute("data-backup")
    cluster.psql("DELETE FROM t WHERE i = 2", db="app")
    await row.locator("button:text('Restore')").click()
    assert "over the database" in (await page.text_content("#confirm-text") or "")
    await page.check("input[name=where][value=beside]")
    await page.fill("#beside-name", "app_copy")
    text = await page.text_content("#confirm-text") or ""
    assert 'new database "app_copy"' in text and "not touched" in text and str(name) in text
    await page.screenshot(path=str(ARTIFACTS / "web-7-restore-beside.png"))
    await page.click("#confirm-ok")
    done = page.locator("#jobs tbody tr[data-status=succeeded]", has_text="restore")
    await done.first.wait_for(timeout=120_000)
    assert cluster.psql("SELECT string_agg(i::text, ',' ORDER BY i) FROM t",
                        db="app_copy") == "1,2"
    assert await rows(cluster) == [1]  # the live database as it was
    assert problems == []
    await context.close()
