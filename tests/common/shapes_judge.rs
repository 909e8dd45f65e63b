//! Reads a picture of the "shapes" world (models/shapes, tools/train_shapes.py) back into
//! words: shape colour, background colour, position and shape kind, from plain pixel
//! statistics, so tests can check that a generated image shows what its prompt asked for.

/// Colour names and the RGB values the training renderer paints (tools/train_shapes.py).
pub const COLOURS: [(&str, [f32; 3]); 5] = [
    ("red", [220.0, 40.0, 40.0]),
    ("green", [40.0, 170.0, 60.0]),
    ("blue", [40.0, 70.0, 220.0]),
    ("yellow", [240.0, 220.0, 40.0]),
    ("white", [245.0, 245.0, 245.0]),
];

/// What a caption of the world says: "a {colour} {shape} at the {position} on a
/// {background} background" ("in the center" for the middle).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scene {
    pub colour: String,
    pub shape: String,
    pub position: String,
    pub background: String,
}

impl Scene {
    pub fn new(colour: &str, shape: &str, position: &str, background: &str) -> Scene {
        Scene {
            colour: colour.into(),
            shape: shape.into(),
            position: position.into(),
            background: background.into(),
        }
    }

    /// The caption in the training template.
    pub fn prompt(&self) -> String {
        let place = if self.position == "center" {
            "in the center".to_string()
        } else {
            format!("at the {}", self.position)
        };
        format!("a {} {} {place} on a {} background", self.colour, self.shape, self.background)
    }

    /// How many of the four attributes agree with `other`.
    pub fn matches(&self, other: &Scene) -> usize {
        [
            self.colour == other.colour,
            self.shape == other.shape,
            self.position == other.position,
            self.background == other.background,
        ]
        .iter()
        .filter(|same| **same)
        .count()
    }
}

fn distance(a: [f32; 3], b: [f32; 3]) -> f32 {
    a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum::<f32>().sqrt()
}

fn nearest_colour(rgb: [f32; 3]) -> usize {
    (0..COLOURS.len())
        .min_by(|&a, &b| distance(rgb, COLOURS[a].1).total_cmp(&distance(rgb, COLOURS[b].1)))
        .expect("the palette is not empty")
}

/// Judges a `size`×`size` RGB8 image (row-major). Pixels that differ clearly from the
/// border's colour are the shape; its largest connected piece gives the position (centroid)
/// and the kind (see [`shape_kind`]).
pub fn judge(rgb: &[u8], size: usize) -> Scene {
    judge_in_detail(rgb, size).scene
}

/// What [`judge`] read, with the measured colours behind it.
#[derive(Debug, Clone)]
pub struct Reading {
    pub scene: Scene,
    /// Mean RGB of the shape's pixels (anti-aliased edge included).
    pub shape_rgb: [f32; 3],
    /// Per-channel median of the border pixels.
    pub background_rgb: [f32; 3],
}

impl Reading {
    /// Mean RGB distance (0-255 scale) of the measured shape and background colours from
    /// the palette colours `expected` names: how cleanly the picture paints what was asked.
    pub fn colour_error(&self, expected: &Scene) -> f32 {
        let palette =
            |name: &str| COLOURS.iter().find(|(n, _)| *n == name).expect("a palette colour name").1;
        (distance(self.shape_rgb, palette(&expected.colour))
            + distance(self.background_rgb, palette(&expected.background)))
            / 2.0
    }
}

/// [`judge`], also returning the measured colours.
pub fn judge_in_detail(rgb: &[u8], size: usize) -> Reading {
    assert_eq!(rgb.len(), size * size * 3, "image must be size×size RGB");
    let pixel = |x: usize, y: usize| {
        let i = (y * size + x) * 3;
        [rgb[i] as f32, rgb[i + 1] as f32, rgb[i + 2] as f32]
    };
    // Background: per-channel median of the one-pixel frame (the shapes stay off the edge).
    let mut frame: Vec<[f32; 3]> = Vec::new();
    for i in 0..size {
        frame.extend([pixel(i, 0), pixel(i, size - 1), pixel(0, i), pixel(size - 1, i)]);
    }
    let mut background = [0.0f32; 3];
    for (channel, value) in background.iter_mut().enumerate() {
        let mut values: Vec<f32> = frame.iter().map(|p| p[channel]).collect();
        values.sort_by(f32::total_cmp);
        *value = values[values.len() / 2];
    }
    let background_index = nearest_colour(background);

    let mask: Vec<bool> =
        (0..size * size).map(|i| distance(pixel(i % size, i / size), background) > 80.0).collect();
    let component = largest_component(&mask, size);

    // Shape colour: the palette colour most of the piece's pixels are closest to, leaving
    // out the background's own (anti-aliased edges).
    let mut votes = [0usize; COLOURS.len()];
    for &i in &component {
        votes[nearest_colour(pixel(i % size, i / size))] += 1;
    }
    votes[background_index] = 0;
    let colour_index = (0..COLOURS.len()).max_by_key(|&c| votes[c]).expect("palette not empty");

    let mut shape_rgb = [0.0f32; 3];
    for &i in &component {
        let p = pixel(i % size, i / size);
        for c in 0..3 {
            shape_rgb[c] += p[c] / component.len() as f32;
        }
    }

    let (position, shape) = if component.is_empty() {
        ("none".to_string(), "none".to_string())
    } else {
        let n = component.len() as f32;
        let cx = component.iter().map(|&i| (i % size) as f32 + 0.5).sum::<f32>() / n;
        let cy = component.iter().map(|&i| (i / size) as f32 + 0.5).sum::<f32>() / n;
        let half = size as f32 / 2.0;
        let position =
            if (cx - half).abs() < size as f32 / 8.0 && (cy - half).abs() < size as f32 / 8.0 {
                "center".to_string()
            } else {
                let vertical = if cy < half { "top" } else { "bottom" };
                let horizontal = if cx < half { "left" } else { "right" };
                format!("{vertical} {horizontal}")
            };
        let shape = shape_kind(&component, size);
        (position, shape.to_string())
    };
    let scene = Scene {
        colour: COLOURS[colour_index].0.into(),
        shape,
        position,
        background: COLOURS[background_index].0.into(),
    };
    Reading { scene, shape_rgb, background_rgb: background }
}

/// Circle, square or triangle, from two ratios that survive blurred edges and rounded
/// corners: an upright triangle has far less area in the top third of its bounding box than
/// in the bottom third; a square reaches √2 further along the diagonals than along the axes,
/// a circle equally far.
fn shape_kind(component: &[usize], size: usize) -> &'static str {
    let (y0, y1) = min_max(component.iter().map(|&i| i / size));
    let third = (y1 - y0 + 1) as f32 / 3.0;
    let top = component.iter().filter(|&&i| ((i / size - y0) as f32) < third).count();
    let bottom = component.iter().filter(|&&i| ((y1 - i / size) as f32) < third).count();
    let extent = |project: &dyn Fn(f32, f32) -> f32| {
        let values = component.iter().map(|&i| project((i % size) as f32, (i / size) as f32));
        let (lo, hi) = values.fold((f32::MAX, f32::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
        hi - lo + 1.0
    };
    let axes = extent(&|x, _| x) + extent(&|_, y| y);
    let diagonals = extent(&|x, y| (x + y) / std::f32::consts::SQRT_2)
        + extent(&|x, y| (x - y) / std::f32::consts::SQRT_2);
    let top_to_bottom = top as f32 / bottom.max(1) as f32;
    let diagonal_to_axes = diagonals / axes;
    if std::env::var_os("SHAPES_JUDGE_DEBUG").is_some() {
        eprintln!("top/bottom {top_to_bottom:.2} diagonal/axes {diagonal_to_axes:.3}");
    }
    if top_to_bottom < 0.6 {
        "triangle"
    } else if diagonal_to_axes > 1.15 {
        "square"
    } else {
        "circle"
    }
}

fn min_max(values: impl Iterator<Item = usize>) -> (usize, usize) {
    values.fold((usize::MAX, 0), |(lo, hi), v| (lo.min(v), hi.max(v)))
}

/// Indices of the largest 4-connected set of `true` pixels.
fn largest_component(mask: &[bool], size: usize) -> Vec<usize> {
    let mut seen = vec![false; mask.len()];
    let mut best = Vec::new();
    for start in 0..mask.len() {
        if !mask[start] || seen[start] {
            continue;
        }
        seen[start] = true;
        let mut piece = vec![start];
        let mut next = 0;
        while next < piece.len() {
            let i = piece[next];
            next += 1;
            let (x, y) = (i % size, i / size);
            let mut neighbours = Vec::with_capacity(4);
            if x > 0 {
                neighbours.push(i - 1);
            }
            if x + 1 < size {
                neighbours.push(i + 1);
            }
            if y > 0 {
                neighbours.push(i - size);
            }
            if y + 1 < size {
                neighbours.push(i + size);
            }
            for j in neighbours {
                if mask[j] && !seen[j] {
                    seen[j] = true;
                    piece.push(j);
                }
            }
        }
        if piece.len() > best.len() {
            best = piece;
        }
    }
    best
}
