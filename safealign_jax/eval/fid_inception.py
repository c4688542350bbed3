"""The FID Inception-v3 (TensorFlow's 2015-12-05 graph as ported by pytorch-fid), in plain torch.

Same module names as torchvision's `inception_v3` with pytorch-fid's FID patches (average pools
exclude padding; the last block max-pools), so pytorch-fid's weights file
`pt_inception-2015-12-05-6726825d.pth` loads directly. torchvision is not needed (its PyPI
builds do not match CPU torch). Output: pool3 features (B, 2048). torch is imported inside
`build_fid_inception` only.
"""

from __future__ import annotations


def build_fid_inception():
    """A randomly initialised FID Inception (eval mode); load weights with `load_state_dict`.

    forward(x): float (B, 3, H, W) in [0, 1] -> (B, 2048); resizes to 299 x 299 (bilinear,
    align_corners=False) and scales to [-1, 1] first, as pytorch-fid does.
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    class BasicConv2d(nn.Module):
        def __init__(self, cin, cout, kernel, stride=1, padding=0):
            super().__init__()
            self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
            self.bn = nn.BatchNorm2d(cout, eps=0.001)

        def forward(self, x):
            return F.relu(self.bn(self.conv(x)))

    def avg_pool(x):
        return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)

    class InceptionA(nn.Module):
        def __init__(self, cin, pool_features):
            super().__init__()
            self.branch1x1 = BasicConv2d(cin, 64, 1)
            self.branch5x5_1 = BasicConv2d(cin, 48, 1)
            self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
            self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
            self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
            self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
            self.branch_pool = BasicConv2d(cin, pool_features, 1)

        def forward(self, x):
            b5 = self.branch5x5_2(self.branch5x5_1(x))
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(avg_pool(x))], 1)

    class InceptionB(nn.Module):
        def __init__(self, cin):
            super().__init__()
            self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
            self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
            self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
            self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

        def forward(self, x):
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)

    class InceptionC(nn.Module):
        def __init__(self, cin, c7):
            super().__init__()
            self.branch1x1 = BasicConv2d(cin, 192, 1)
            self.branch7x7_1 = BasicConv2d(cin, c7, 1)
            self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
            self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
            self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
            self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
            self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
            self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
            self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
            self.branch_pool = BasicConv2d(cin, 192, 1)

        def forward(self, x):
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            d = x
            for i in range(1, 6):
                d = getattr(self, f"branch7x7dbl_{i}")(d)
            return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(avg_pool(x))], 1)

    class InceptionD(nn.Module):
        def __init__(self, cin):
            super().__init__()
            self.branch3x3_1 = BasicConv2d(cin, 192, 1)
            self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
            self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
            self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
            self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
            self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

        def forward(self, x):
            b3 = self.branch3x3_2(self.branch3x3_1(x))
            b7 = x
            for i in range(1, 5):
                b7 = getattr(self, f"branch7x7x3_{i}")(b7)
            return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)

    class InceptionE(nn.Module):
        def __init__(self, cin, max_pool):
            super().__init__()
            self.max_pool = max_pool
            self.branch1x1 = BasicConv2d(cin, 320, 1)
            self.branch3x3_1 = BasicConv2d(cin, 384, 1)
            self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
            self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
            self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
            self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
            self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
            self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
            self.branch_pool = BasicConv2d(cin, 192, 1)

        def forward(self, x):
            b3 = self.branch3x3_1(x)
            b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
            d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
            pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg_pool(x)
            return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pooled)], 1)

    class FIDInceptionV3(nn.Module):
        def __init__(self):
            super().__init__()
            self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
            self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
            self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
            self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
            self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
            self.Mixed_5b = InceptionA(192, 32)
            self.Mixed_5c = InceptionA(256, 64)
            self.Mixed_5d = InceptionA(288, 64)
            self.Mixed_6a = InceptionB(288)
            self.Mixed_6b = InceptionC(768, 128)
            self.Mixed_6c = InceptionC(768, 160)
            self.Mixed_6d = InceptionC(768, 160)
            self.Mixed_6e = InceptionC(768, 192)
            self.Mixed_7a = InceptionD(768)
            self.Mixed_7b = InceptionE(1280, max_pool=False)
            self.Mixed_7c = InceptionE(2048, max_pool=True)

        def forward(self, x):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            x = 2 * x - 1
            x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
            x = F.max_pool2d(x, 3, stride=2)
            x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
            x = F.max_pool2d(x, 3, stride=2)
            for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
                x = getattr(self, f"Mixed_{name}")(x)
            return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    return FIDInceptionV3().eval()
