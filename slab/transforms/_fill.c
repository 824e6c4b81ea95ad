/* Seeded flood fill for hysteresis thresholding, in compiled code that releases the GIL.
 *
 * fill(values, state, high, connectivity)
 *   values: C-contiguous 3D float32 or float64 buffer (Z, Y, X: X fastest)
 *   state:  C-contiguous 3D uint8 buffer of the same shape: 1 where values > low, else 0
 *   high:   seeds are fillable voxels with values > high (strict, in the buffer's precision
 *           against the threshold as given: the caller rounds it)
 *   connectivity: 6, 18 or 26
 *
 * Fillable voxels connected to a seed become 2; the fill reads and writes the one-byte state
 * (a fifth of the memory traffic of testing the values again) and reads the values only to find
 * seeds. It works on runs (maximal spans of fillable voxels along X): a forward and a backward
 * pass over the rows in memory order fill every run that a seed or an already filled neighbour
 * row reaches, and a scanline fill (spans on a stack) spreads from what the backward pass fills
 * into the paths that turn back (see DEFINE_FILL). Rows are searched with memchr, runs measured
 * eight bytes at a time and filled with memset, so a dense map costs little more than two
 * sequential passes; the stack holds spans, not voxels.
 *
 * Part of slab; the same licence as the rest of the repository (Apache-2.0).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    Py_ssize_t z, y, x0, x1;
} Span;

typedef struct {
    Span *data;
    size_t size, capacity;
} Stack;

static int push(Stack *s, Py_ssize_t z, Py_ssize_t y, Py_ssize_t x0, Py_ssize_t x1) {
    if (s->size == s->capacity) {
        size_t capacity = s->capacity ? 2 * s->capacity : 256;
        Span *data = (Span *)realloc(s->data, capacity * sizeof(Span));
        if (!data) return -1;
        s->data = data;
        s->capacity = capacity;
    }
    Span span = {z, y, x0, x1};
    s->data[s->size++] = span;
    return 0;
}

/* Neighbour rows (dz, dy) and how far each widens the X range, per connectivity. */
typedef struct {
    int dz, dy, widen;
} Row;

/* Rows of the other planes come first so that the spans pushed last, and so popped first, lie
 * in the same plane: the fill walks a plane before it moves on, and stays in cache. */
static const Row ROWS_6[] = {{-1, 0, 0}, {1, 0, 0}, {0, -1, 0}, {0, 1, 0}};
static const Row ROWS_18[] = {{-1, -1, 0}, {-1, 1, 0}, {1, -1, 0}, {1, 1, 0},
                              {-1, 0, 1}, {1, 0, 1}, {0, -1, 1}, {0, 1, 1}};
static const Row ROWS_26[] = {{-1, -1, 1}, {-1, 1, 1}, {1, -1, 1}, {1, 1, 1},
                              {-1, 0, 1}, {1, 0, 1}, {0, -1, 1}, {0, 1, 1}};
/* The rows before a row in memory order (dz < 0, or dz == 0 and dy < 0), and those after. */
static const Row BEFORE_6[] = {{-1, 0, 0}, {0, -1, 0}};
static const Row AFTER_6[] = {{1, 0, 0}, {0, 1, 0}};
static const Row BEFORE_18[] = {{-1, -1, 0}, {-1, 1, 0}, {-1, 0, 1}, {0, -1, 1}};
static const Row AFTER_18[] = {{1, 1, 0}, {1, -1, 0}, {1, 0, 1}, {0, 1, 1}};
static const Row BEFORE_26[] = {{-1, -1, 1}, {-1, 1, 1}, {-1, 0, 1}, {0, -1, 1}};
static const Row AFTER_26[] = {{1, 1, 1}, {1, -1, 1}, {1, 0, 1}, {0, 1, 1}};

/* state: 1 = fillable (> low), 0 = not; filled voxels become 2. */
#define ONES 0x0101010101010101ULL

/* The last index of the run of fillable voxels that starts at k (row[k] == 1), up to nx - 1:
 * eight bytes at a time while they are all fillable. */
static inline Py_ssize_t run_end(const uint8_t *row, Py_ssize_t k, Py_ssize_t nx) {
    Py_ssize_t b = k + 1;
    uint64_t word;
    while (b + 8 <= nx) {
        memcpy(&word, row + b, 8);
        if (word != ONES) break;
        b += 8;
    }
    while (b < nx && row[b] == 1) ++b;
    return b - 1;
}

/* The first fillable voxel of row[k..hi], or -1: memchr skips filled and empty voxels many
 * bytes at a time (dense maps are mostly rows already filled). */
static inline Py_ssize_t next_fillable(const uint8_t *row, Py_ssize_t k, Py_ssize_t hi) {
    if (k > hi) return -1;
    const uint8_t *p = (const uint8_t *)memchr(row + k, 1, (size_t)(hi - k + 1));
    return p ? (Py_ssize_t)(p - row) : -1;
}

/* Whether row[k..b] of the rows `rows` around (z, y) (each widened by its `widen`) holds a
 * filled voxel. */
static inline int touches(const uint8_t *state, Py_ssize_t z, Py_ssize_t y, Py_ssize_t k, Py_ssize_t b,
                          Py_ssize_t nz, Py_ssize_t ny, Py_ssize_t nx, const Row *rows, int nrows) {
    for (int r = 0; r < nrows; ++r) {
        const Py_ssize_t zz = z + rows[r].dz, yy = y + rows[r].dy;
        if (zz < 0 || zz >= nz || yy < 0 || yy >= ny) continue;
        Py_ssize_t lo = k - rows[r].widen, hi = b + rows[r].widen;
        if (lo < 0) lo = 0;
        if (hi >= nx) hi = nx - 1;
        if (memchr(state + (zz * ny + yy) * nx + lo, 2, (size_t)(hi - lo + 1))) return 1;
    }
    return 0;
}

/* Fill every fillable run of the rows `rows` around span s that it reaches, pushing each. */
static inline int spread(Stack *stack, uint8_t *state, Span s, Py_ssize_t nz, Py_ssize_t ny, Py_ssize_t nx,
                         const Row *rows, int nrows) {
    for (int r = 0; r < nrows; ++r) {
        const Py_ssize_t zz = s.z + rows[r].dz, yy = s.y + rows[r].dy;
        if (zz < 0 || zz >= nz || yy < 0 || yy >= ny) continue;
        uint8_t *row = state + (zz * ny + yy) * nx;
        Py_ssize_t lo = s.x0 - rows[r].widen, hi = s.x1 + rows[r].widen;
        if (lo < 0) lo = 0;
        if (hi >= nx) hi = nx - 1;
        for (Py_ssize_t k = next_fillable(row, lo, hi); k >= 0; k = next_fillable(row, k, hi)) {
            Py_ssize_t left = k;
            if (k == lo) /* past lo only; inside, row[k - 1] was scanned */
                while (left > 0 && row[left - 1] == 1) --left;
            Py_ssize_t right = run_end(row, k, nx);
            memset(row + left, 2, (size_t)(right - left + 1));
            if (push(stack, zz, yy, left, right)) return -1;
            k = right + 2; /* row[right + 1] is not fillable */
        }
    }
    return 0;
}

/* Three steps, each exact, together the flood fill (Vincent's hybrid reconstruction, on runs):
 * 1. forward, rows in memory order: a run of fillable voxels is filled when it holds a seed or
 *    touches a filled voxel in a row before it (those rows are final for this pass);
 * 2. backward, rows in reverse order: a run still fillable is filled when it touches a filled
 *    voxel in a row after it;
 * 3. a run filled in step 2 may reach, through rows after it that step 2 has passed, runs that
 *    neither pass could see (a path that turns back twice): from it, a scanline fill spreads to
 *    the rows after it, and everything that fill reaches spreads to every neighbouring row.
 * A reachable run left unfilled would have a filled neighbour on its path filled in one of the
 * steps, and that step fills it: the rows before a run are final when step 1 reaches it, the
 * rows after it when step 2 does, and step 3 spreads everything else. Steps 1 and 2 read memory
 * in order; step 3 walks only the paths that turn back. */
#define DEFINE_FILL(NAME, TYPE)                                                                   \
    static int NAME(const TYPE *v, uint8_t *state, Py_ssize_t nz, Py_ssize_t ny, Py_ssize_t nx,    \
                    TYPE high, const Row *all, int nall, const Row *before, const Row *after,      \
                    int nhalf) {                                                                   \
        Stack stack = {NULL, 0, 0};                                                                \
        for (Py_ssize_t z = 0; z < nz; ++z)                                                        \
            for (Py_ssize_t y = 0; y < ny; ++y) {                                                  \
                uint8_t *row = state + (z * ny + y) * nx;                                          \
                const TYPE *values = v + (z * ny + y) * nx;                                        \
                for (Py_ssize_t k = next_fillable(row, 0, nx - 1); k >= 0;                         \
                     k = next_fillable(row, k, nx - 1)) {                                          \
                    const Py_ssize_t b = run_end(row, k, nx);                                      \
                    int fill = touches(state, z, y, k, b, nz, ny, nx, before, nhalf);              \
                    for (Py_ssize_t m = k; !fill && m <= b; ++m) fill = values[m] > high;          \
                    if (fill) memset(row + k, 2, (size_t)(b - k + 1));                             \
                    k = b + 2;                                                                     \
                }                                                                                  \
            }                                                                                      \
        for (Py_ssize_t z = nz - 1; z >= 0; --z)                                                   \
            for (Py_ssize_t y = ny - 1; y >= 0; --y) {                                             \
                uint8_t *row = state + (z * ny + y) * nx;                                          \
                for (Py_ssize_t k = next_fillable(row, 0, nx - 1); k >= 0;                         \
                     k = next_fillable(row, k, nx - 1)) {                                          \
                    const Py_ssize_t b = run_end(row, k, nx);                                      \
                    if (touches(state, z, y, k, b, nz, ny, nx, after, nhalf)) {                    \
                        memset(row + k, 2, (size_t)(b - k + 1));                                   \
                        Span first = {z, y, k, b};                                                 \
                        if (spread(&stack, state, first, nz, ny, nx, after, nhalf)) goto fail;     \
                        while (stack.size)                                                         \
                            if (spread(&stack, state, stack.data[--stack.size], nz, ny, nx, all,   \
                                       nall))                                                      \
                                goto fail;                                                         \
                    }                                                                              \
                    k = b + 2;                                                                     \
                }                                                                                  \
            }                                                                                      \
        free(stack.data);                                                                          \
        return 0;                                                                                  \
    fail:                                                                                          \
        free(stack.data);                                                                          \
        return -1;                                                                                 \
    }

DEFINE_FILL(fill_float32, float)
DEFINE_FILL(fill_float64, double)

static PyObject *fill(PyObject *self, PyObject *args) {
    PyObject *values_obj, *out_obj;
    double high;
    int connectivity;
    if (!PyArg_ParseTuple(args, "OOdi", &values_obj, &out_obj, &high, &connectivity)) return NULL;
    const Row *rows = connectivity == 6 ? ROWS_6 : connectivity == 18 ? ROWS_18 : connectivity == 26 ? ROWS_26 : NULL;
    const Row *before = connectivity == 6 ? BEFORE_6 : connectivity == 18 ? BEFORE_18 : BEFORE_26;
    const Row *after = connectivity == 6 ? AFTER_6 : connectivity == 18 ? AFTER_18 : AFTER_26;
    const int nrows = connectivity == 6 ? 4 : 8;
    if (!rows) {
        PyErr_SetString(PyExc_ValueError, "connectivity: expected 6, 18 or 26");
        return NULL;
    }
    Py_buffer values, out;
    if (PyObject_GetBuffer(values_obj, &values, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_ND)) return NULL;
    if (PyObject_GetBuffer(out_obj, &out, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_ND | PyBUF_WRITABLE)) {
        PyBuffer_Release(&values);
        return NULL;
    }
    int status = 0;
    const char *format = values.format ? values.format : "B";
    const int is32 = format[0] == 'f' && format[1] == '\0' && values.itemsize == 4;
    const int is64 = format[0] == 'd' && format[1] == '\0' && values.itemsize == 8;
    if (values.ndim != 3 || out.ndim != 3 || out.itemsize != 1 || (!is32 && !is64)) {
        PyErr_SetString(PyExc_ValueError, "fill: expected a 3D float32/float64 volume and a 3D uint8 state");
        status = 1;
    } else if (values.shape[0] != out.shape[0] || values.shape[1] != out.shape[1] || values.shape[2] != out.shape[2]) {
        PyErr_SetString(PyExc_ValueError, "fill: the state's shape differs from the volume's");
        status = 1;
    } else {
        const Py_ssize_t nz = values.shape[0], ny = values.shape[1], nx = values.shape[2];
        int failed;
        Py_BEGIN_ALLOW_THREADS
        if (is32)
            failed = fill_float32((const float *)values.buf, (uint8_t *)out.buf, nz, ny, nx, (float)high, rows, nrows, before, after,
                                  nrows / 2);
        else
            failed = fill_float64((const double *)values.buf, (uint8_t *)out.buf, nz, ny, nx, high, rows, nrows, before, after, nrows / 2);
        Py_END_ALLOW_THREADS
        if (failed) {
            PyErr_NoMemory();
            status = 1;
        }
    }
    PyBuffer_Release(&values);
    PyBuffer_Release(&out);
    if (status) return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"fill", fill, METH_VARARGS,
     "fill(values, state, high, connectivity): hysteresis flood fill of a C-contiguous 3D float32/float64 "
     "volume's state (uint8 of its shape: 1 where > low, else 0); fillable voxels > high seed fills that "
     "set every fillable voxel they reach to 2."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fill", "Seeded hysteresis flood fill.", -1, methods};

PyMODINIT_FUNC PyInit__fill(void) { return PyModule_Create(&module); }
