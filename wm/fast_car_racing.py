"""FastCarRacing: gymnasium's CarRacing-v3 with faster rendering internals.

It overrides only how frames are drawn. Its observations are byte-identical
to the stock environment's for the same seed and actions (tests/test_env.py
checks it frame by frame), and it steps several times faster, because
rendering is about 97% of a stock step. wm/env.py registers it as
FastCarRacing-v3, and `make_env(fast=True)` makes it. How:

* `_render_road` rotates, translates and culls about 800 polygons one vertex
  at a time in Python every frame. Here all vertices are transformed at once
  with numpy, using the exact arithmetic of pygame's `Vector2.rotate_rad`
  (angle normalised into [0, 2pi), exact quarter turns special-cased, then
  x*cos - y*sin and x*sin + y*cos in float64), and only the polygons that the
  stock code would draw, and that can leave a pixel in the frame, reach
  pygame, in the same order, with the same float coordinates. A bounding
  circle per polygon culls most of them before their vertices are
  transformed. Rows that the dashboard paints black after the flip count as
  invisible.
* The background polygon covers the whole window except near the playfield
  edge; when it provably covers every pixel, a fill gives the same pixels.
* Observations skip the full-size vertical flip. pygame's smoothscale
  shrinks along x first, row by row, then along y, so the road is shrunk to
  96 columns first, flipped there, and the dashboard (drawn apart) is shrunk
  into the rows below it; the y pass then gives the stock pixels. Windows and
  videos, and the rare frame whose speed or wheel bar grows above the
  dashboard into the road, take the stock route: a full flip (a numpy copy
  into a reused surface).
* The surfaces are reused, and the car's vertices are transformed in one pass.
* The score font is built once instead of every frame, and the rendered score
  text is cached by its string.
"""

from __future__ import annotations

import math

import numpy as np
import pygame
from gymnasium.envs.box2d import car_dynamics as cd
from gymnasium.envs.box2d import car_racing as cr
from gymnasium.envs.box2d.car_racing import CarRacing
from pygame import gfxdraw

_TWO_PI = 2 * math.pi
_HALF_PI = math.pi / 2
_VECTOR_EPSILON = 1e-6  # pygame's default Vector2.epsilon
# _render_indicators paints window rows 700-799 black after the flip, i.e.
# rows 0-99 of the unflipped road drawing.
_DASHBOARD_ROWS = round(5 * cr.WINDOW_H / 40.0)
_ROAD_ROWS = cr.WINDOW_H - _DASHBOARD_ROWS  # the window rows that show the road


def rotate_like_pygame(points: np.ndarray, angle: float) -> np.ndarray:
    """`[Vector2(p).rotate_rad(angle) for p in points]`, vectorised, bit-exact.

    points: (..., 2) float64. pygame normalises the angle into [0, 2pi) before
    taking cos and sin, and returns exact results for quarter turns.
    """
    a = math.fmod(angle, _TWO_PI)
    if a < 0:
        a += _TWO_PI
    x, y = points[..., 0], points[..., 1]
    if math.fmod(a + _VECTOR_EPSILON, _HALF_PI) < 2 * _VECTOR_EPSILON:
        quarter = int((a + _VECTOR_EPSILON) / _HALF_PI) % 4
        rx, ry = [(x, y), (-y, x), (-x, -y), (y, -x)][quarter]
    else:
        c, s = math.cos(a), math.sin(a)
        rx, ry = c * x - s * y, s * x + c * y
    return np.stack([rx, ry], axis=-1)


def _grass_polygons() -> np.ndarray:
    """The stock grass patches, in the stock drawing order: (400, 4, 2)."""
    g = cr.GRASS_DIM
    return np.array([
        [(g * x + g, g * y + 0), (g * x + 0, g * y + 0), (g * x + 0, g * y + g), (g * x + g, g * y + g)]
        for x in range(-20, 20, 2) for y in range(-20, 20, 2)
    ], dtype=np.float64)


class FastCarRacing(CarRacing):
    """CarRacing-v3 with faster rendering; observations are byte-identical."""

    _GRASS = _grass_polygons()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # False: step() leaves the observation as it was, unrendered (frames
        # the agent never sees; see step_repeat).
        self.render_observations = True
        self._font = None
        self._text_cache: dict[str, pygame.Surface] = {}
        self._road_key = None
        self._polys = None
        self._car_key = None
        # Reused every frame instead of allocating new surfaces.
        self._canvas = pygame.Surface((cr.WINDOW_W, cr.WINDOW_H))
        self._flipped = pygame.Surface((cr.WINDOW_W, cr.WINDOW_H))
        self._road_x = pygame.Surface((cr.STATE_W, _ROAD_ROWS))  # the road, x pass, unflipped
        self._tall = pygame.Surface((cr.STATE_W, cr.WINDOW_H))  # x pass of the whole window
        self._dash_x = self._tall.subsurface((0, _ROAD_ROWS, cr.STATE_W, _DASHBOARD_ROWS))

    def _polygons(self) -> np.ndarray:
        """The playfield, the 400 grass patches and every road and border
        polygon as one (1 + 400 + N, 4, 2) array, so a frame transforms and
        culls them in one pass; rebuilt only when reset() makes a new track.
        Colours are NOT cached: a tile's colour array is mutated in place when
        the car visits it."""
        if self._road_key is not self.road_poly:
            self._road_key = self.road_poly
            b = cr.PLAYFIELD
            field = np.array([[(b, b), (b, -b), (-b, -b), (-b, b)]], dtype=np.float64)
            road = np.array([poly for poly, _ in self.road_poly], dtype=np.float64).reshape(-1, 4, 2)
            self._polys = np.concatenate([field, self._GRASS, road])
            # A circle around each polygon, for a cheap first cull.
            centers = self._polys.mean(axis=1)  # (P, 2)
            self._radii = np.linalg.norm(self._polys - centers[:, None], axis=-1).max(axis=1)
            # The playfield's corners, then the other centres: one transform a frame.
            self._cull_points = np.concatenate([field[0], centers[1:]])  # (4 + P - 1, 2)
        return self._polys

    @staticmethod
    def _screen_xy(polys: np.ndarray, zoom, translation, angle) -> np.ndarray:
        """World to window coordinates, with the stock arithmetic and order:
        rotate (as pygame does), then * zoom, then + translation."""
        xy = rotate_like_pygame(polys, angle)
        xy *= zoom
        xy[..., 0] += translation[0]
        xy[..., 1] += translation[1]
        return xy

    @staticmethod
    def _visible(xy: np.ndarray) -> np.ndarray:
        """Indices of the polygons that can change a pixel: the stock culling
        test (any vertex inside the window grown by MAX_SHAPE_DIM, about
        380 px), narrowed to those whose bounding box meets the window grown
        by 2 px (room for the anti-aliased edge and integer rounding), less
        its first 100 rows, which become the dashboard after the vertical
        flip and are painted black before anything else is drawn there.
        Drawing any other polygon leaves no pixel in the frame, so skipping it
        keeps the frame identical."""
        m, e = cr.MAX_SHAPE_DIM, 2.0
        x, y = xy[..., 0], xy[..., 1]
        meets = ((x.max(-1) >= -e) & (x.min(-1) <= cr.WINDOW_W + e)
                 & (y.max(-1) >= _DASHBOARD_ROWS - e) & (y.min(-1) <= cr.WINDOW_H + e))
        idx = np.flatnonzero(meets)
        # The stock test, on the few survivors only.
        xs, ys = x[idx], y[idx]
        stock = ((-m <= xs) & (xs <= cr.WINDOW_W + m) & (-m <= ys) & (ys <= cr.WINDOW_H + m)).any(axis=-1)
        return idx[stock]

    def _draw(self, poly: list, color) -> None:
        """The stock polygon: anti-aliased outline, then fill."""
        gfxdraw.aapolygon(self.surf, poly, color)
        gfxdraw.filled_polygon(self.surf, poly, color)

    def _near_window(self, c: np.ndarray, zoom) -> np.ndarray:
        """Indices of the polygons (playfield excluded) whose bounding circle,
        centred at window point c, comes within a few pixels of the drawn part
        of the window: a cheap, generous first cull, so that only these few
        dozen polygons have their vertices transformed and go through the
        exact tests of `_visible`."""
        r = self._radii[1:] * zoom + 4.0  # + 4 px: rounding, and the 2 px of `_visible`
        near = ((c[:, 0] + r >= 0) & (c[:, 0] - r <= cr.WINDOW_W)
                & (c[:, 1] + r >= _DASHBOARD_ROWS) & (c[:, 1] - r <= cr.WINDOW_H))
        return np.flatnonzero(near) + 1

    def _render_road(self, zoom, translation, angle):
        polys = self._polygons()
        points = self._screen_xy(self._cull_points, zoom, translation, angle)
        field = points[:4].tolist()  # the same arithmetic, point by point, as the polygon alone
        if _covers_window(field):
            # Every pixel is inside the playfield; its anti-aliased edge is off the window.
            self.surf.fill(self.bg_color)
        else:
            self.surf.fill((0, 0, 0))  # a new stock surface starts black
            self._draw(field, self.bg_color)  # never culled in the stock code
        near = self._near_window(points[4:], zoom)
        xy = self._screen_xy(polys[near], zoom, translation, angle)  # same arithmetic per vertex
        visible = self._visible(xy)
        first_road = 1 + len(self._GRASS)
        grass = [int(c) for c in self.grass_color]
        for i, poly in zip(near[visible].tolist(), xy[visible].tolist()):
            # Road colours are read every frame: a visited tile's changes in place.
            color = grass if i < first_road else [int(c) for c in self.road_poly[i - first_road][1]]
            self._draw(poly, color)

    def _render(self, mode: str):
        # The stock _render, with the score font built once and its text cached.
        assert mode in self.metadata["render_modes"]
        if mode == "state_pixels" and not self.render_observations:
            return self.state.copy()  # stock step() stores it back: the last rendered observation
        pygame.font.init()
        if self.screen is None and mode == "human":
            pygame.display.init()
            self.screen = pygame.display.set_mode((cr.WINDOW_W, cr.WINDOW_H))
        if self.clock is None:
            self.clock = pygame.time.Clock()
        if "t" not in self.__dict__:
            return  # reset() not called yet

        self.surf = self._canvas
        assert self.car is not None
        angle = -self.car.hull.angle
        zoom = 0.1 * cr.SCALE * max(1 - self.t, 0) + cr.ZOOM * cr.SCALE * min(self.t, 1)
        scroll_x = -(self.car.hull.position[0]) * zoom
        scroll_y = -(self.car.hull.position[1]) * zoom
        trans = pygame.math.Vector2((scroll_x, scroll_y)).rotate_rad(angle)
        trans = (cr.WINDOW_W / 2 + trans[0], cr.WINDOW_H / 4 + trans[1])

        self._render_road(zoom, trans, angle)
        if mode in ["state_pixels_list", "state_pixels"]:
            self._draw_car(zoom, trans, angle)
        else:  # windows and videos also draw the tyre particles
            self.car.draw(self.surf, zoom, trans, angle, True)
        if mode == "state_pixels" and not self._bars_leave_dashboard():
            return self._state_pixels()
        self.surf = self._flip(self._canvas)
        self._draw_dashboard()

        if mode == "human":
            pygame.event.pump()
            self.clock.tick(self.metadata["render_fps"])
            assert self.screen is not None
            self.screen.fill(0)
            self.screen.blit(self.surf, (0, 0))
            pygame.display.flip()
        elif mode == "rgb_array":
            return self._create_image_array(self.surf, (cr.VIDEO_W, cr.VIDEO_H))
        elif mode == "state_pixels":
            return self._create_image_array(self.surf, (cr.STATE_W, cr.STATE_H))
        else:
            return self.isopen

    def _draw_car(self, zoom, translation, angle) -> None:
        """`Car.draw` without particles, as for observations, with every vertex
        moved to the world and then to the window in numpy passes instead of
        one Box2D and one Vector2 call at a time. Box2D's b2Mul works in
        float32, and so does the first pass, in the same order of operations.
        The polygons, their order and colours are the stock ones."""
        if self._car_key is not self.car:  # a new car: its shapes and colours, once
            self._car_key = self.car
            self._car_parts = [(b, [tuple(v) for v in f.shape.vertices], [int(c * 255) for c in obj.color])
                               for b, obj in enumerate(self.car.drawlist) for f in obj.fixtures]
        bodies = self.car.drawlist
        local, owner, shapes = [], [], []  # vertices in their body's frame, its index, (count, colour)
        for b, vertices, color in self._car_parts:
            local += vertices
            owner += [b] * len(vertices)
            shapes.append((len(vertices), color))
            stripe = self._wheel_stripe(bodies[b])
            if stripe is not None:
                local += stripe
                owner += [b] * 4
                shapes.append((4, cd.WHEEL_WHITE))
        pose = np.array([(t.q.c, t.q.s, t.position[0], t.position[1]) for t in (o.transform for o in bodies)],
                        dtype=np.float32)[owner]  # (V, 4)
        c, s, px, py = pose.T
        v = np.array(local, dtype=np.float32)  # (V, 2)
        world = np.stack([(c * v[:, 0] - s * v[:, 1]) + px, (s * v[:, 0] + c * v[:, 1]) + py], axis=-1)
        xy = self._screen_xy(world.astype(np.float64), zoom, translation, angle).tolist()
        start = 0
        for n, color in shapes:
            pygame.draw.polygon(self.surf, color=color, points=xy[start:start + n])
            start += n

    @staticmethod
    def _wheel_stripe(obj):
        """The white stripe the stock code draws on a turning wheel, in the
        wheel's frame, or None (also for the hull)."""
        if "phase" not in obj.__dict__:
            return None
        a1, a2 = obj.phase, obj.phase + 1.2
        s1, s2, c1, c2 = math.sin(a1), math.sin(a2), math.cos(a1), math.cos(a2)
        if s1 > 0 and s2 > 0:
            return None
        if s1 > 0:
            c1 = np.sign(c1)
        if s2 > 0:
            c2 = np.sign(c2)
        w, r, size = cd.WHEEL_W, cd.WHEEL_R, cd.SIZE
        return [(-w * size, +r * c1 * size), (+w * size, +r * c1 * size),
                (+w * size, +r * c2 * size), (-w * size, +r * c2 * size)]

    def _draw_dashboard(self) -> None:
        """The stock dashboard and score, drawn on self.surf (rows 700-799)."""
        self._render_indicators(cr.WINDOW_W, cr.WINDOW_H)
        text = self._score_text(f"{self.reward:04.0f}")
        text_rect = text.get_rect()
        text_rect.center = (60, cr.WINDOW_H - cr.WINDOW_H * 2.5 / 40.0)
        self.surf.blit(text, text_rect)

    def _bars_leave_dashboard(self) -> bool:
        """True when the speed bar or a wheel's bar reaches above the dashboard
        (a value over 4 bar units, about 3.9 with a margin for rounding)."""
        v = self.car.hull.linearVelocity
        speed = math.sqrt(v[0] * v[0] + v[1] * v[1])
        return max(0.02 * speed, *(0.01 * w.omega for w in self.car.wheels)) > 3.9

    def _state_pixels(self) -> np.ndarray:
        """The 96x96 observation, with the stock pixels, without flipping the
        1000x800 window: pygame's smoothscale does an x pass on each row and
        then a y pass, and rows are independent in the x pass. So the road
        rows are shrunk along x, then flipped on 96 columns; the dashboard is
        drawn apart and shrunk along x into the rows below; the y pass then
        sees what the stock smoothscale's y pass sees."""
        road = self._canvas.subsurface((0, _DASHBOARD_ROWS, cr.WINDOW_W, _ROAD_ROWS))
        pygame.transform.smoothscale(road, (cr.STATE_W, _ROAD_ROWS), self._road_x)
        self.surf = self._flipped  # only its dashboard rows are drawn and read here
        self._draw_dashboard()
        dash = self._flipped.subsurface((0, _ROAD_ROWS, cr.WINDOW_W, _DASHBOARD_ROWS))
        pygame.transform.smoothscale(dash, (cr.STATE_W, _DASHBOARD_ROWS), self._dash_x)
        tall = pygame.surfarray.pixels2d(self._tall)
        tall[:, :_ROAD_ROWS] = pygame.surfarray.pixels2d(self._road_x)[:, ::-1]
        del tall  # unlock the surface
        return self._create_image_array(self._tall, (cr.STATE_W, cr.STATE_H))

    def _flip(self, src: pygame.Surface) -> pygame.Surface:
        """pygame.transform.flip(src, False, True), into the reused surface."""
        dst = pygame.surfarray.pixels2d(self._flipped)
        # Rows that land in the dashboard are painted black next: skip them.
        dst[:, :_ROAD_ROWS] = pygame.surfarray.pixels2d(src)[:, :_DASHBOARD_ROWS - 1:-1]
        del dst  # unlock the surface
        return self._flipped

    def _score_text(self, s: str) -> pygame.Surface:
        text = self._text_cache.get(s)
        if text is None:
            if self._font is None:
                self._font = pygame.font.Font(pygame.font.get_default_font(), 42)
            if len(self._text_cache) > 4096:
                self._text_cache.clear()
            text = self._text_cache[s] = self._font.render(s, True, (255, 255, 255), (0, 0, 0))
        return text


def _covers_window(quad: list) -> bool:
    """True when the convex quad [[x, y]] * 4 contains the window grown by 4
    pixels on every side (so integer rounding of its edges cannot matter):
    every corner of it lies on the same side of all four edges."""
    sides = set()
    for (x0, y0), (x1, y1) in zip(quad, quad[1:] + quad[:1]):
        ex, ey = x1 - x0, y1 - y0
        for cx, cy in _WINDOW_CORNERS:
            cross = ex * (cy - y0) - ey * (cx - x0)
            sides.add(cross > 0 if cross else None)
    return len(sides) == 1 and None not in sides


_WINDOW_CORNERS = [(-4.0, -4.0), (cr.WINDOW_W + 4.0, -4.0),
                   (cr.WINDOW_W + 4.0, cr.WINDOW_H + 4.0), (-4.0, cr.WINDOW_H + 4.0)]
