/* Seeded flood fill for hysteresis thresholding, in compiled code that releases the GIL.
 *
 * fill(values, state, high, connectivity)
 *   values: C-contiguous 3D float32 or float64 buffer (Z, Y, X: X fastest)
 *   state:  C-contiguous 3D uint8 buffer of the same shape: 1 where values > low, else 0
 *   high:   seeds are fillable voxels with values > high (strict, in the buffer's precision
 *           against the threshold as given: the caller rounds it)
 *   connectivity: 6, 18 or 26
 *
 * Every seed starts a fill through fillable voxels, which become 2. The fill reads and writes
 * the one-byte state only (a fifth of the memory traffic of testing the values again). Scanline filling: a span (a run of fillable voxels along X) is filled at once and
 * pushed; popping it scans the neighbouring rows over the span's range (one voxel wider where the
 * connectivity links diagonally along X), so the work is proportional to the filled voxels plus
 * one pass over the volume for the seeds, and the stack holds spans, not voxels.
 *
 * Part of slab; the same licence as the rest of the repository (Apache-2.0).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>

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

/* state: 1 = fillable (> low), 0 = not; filled voxels become 2. */
#define FILLABLE(k) (row[k] == 1)
#define DEFINE_FILL(NAME, TYPE)                                                                   \
    static int NAME(const TYPE *v, uint8_t *state, Py_ssize_t nz, Py_ssize_t ny, Py_ssize_t nx,    \
                    TYPE high, const Row *rows, int nrows) {                                       \
        Stack stack = {NULL, 0, 0};                                                                \
        const Py_ssize_t plane = ny * nx, n = nz * plane;                                          \
        for (Py_ssize_t i = 0; i < n; ++i) {                                                       \
            if (state[i] != 1 || !(v[i] > high)) continue;                                         \
            Py_ssize_t z = i / plane, y = (i / nx) % ny, x = i % nx;                               \
            uint8_t *row = state + (i - x);                                                        \
            Py_ssize_t a = x, b = x;                                                               \
            while (a > 0 && FILLABLE(a - 1)) --a;                                                  \
            while (b + 1 < nx && FILLABLE(b + 1)) ++b;                                             \
            for (Py_ssize_t k = a; k <= b; ++k) row[k] = 2;                                        \
            if (push(&stack, z, y, a, b)) goto fail;                                               \
            while (stack.size) {                                                                   \
                Span s = stack.data[--stack.size];                                                 \
                for (int r = 0; r < nrows; ++r) {                                                  \
                    const Py_ssize_t zz = s.z + rows[r].dz, yy = s.y + rows[r].dy;                 \
                    if (zz < 0 || zz >= nz || yy < 0 || yy >= ny) continue;                        \
                    row = state + zz * plane + yy * nx;                                            \
                    Py_ssize_t lo = s.x0 - rows[r].widen, hi = s.x1 + rows[r].widen;               \
                    if (lo < 0) lo = 0;                                                            \
                    if (hi >= nx) hi = nx - 1;                                                     \
                    for (Py_ssize_t k = lo; k <= hi; ++k) {                                        \
                        if (!FILLABLE(k)) continue;                                                \
                        Py_ssize_t left = k, right = k;                                            \
                        while (left > 0 && FILLABLE(left - 1)) --left;                             \
                        while (right + 1 < nx && FILLABLE(right + 1)) ++right;                     \
                        for (Py_ssize_t m = left; m <= right; ++m) row[m] = 2;                     \
                        if (push(&stack, zz, yy, left, right)) goto fail;                          \
                        k = right + 1;                                                             \
                    }                                                                              \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
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
            failed = fill_float32((const float *)values.buf, (uint8_t *)out.buf, nz, ny, nx, (float)high, rows, nrows);
        else
            failed = fill_float64((const double *)values.buf, (uint8_t *)out.buf, nz, ny, nx, high, rows, nrows);
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
